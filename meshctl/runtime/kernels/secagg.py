"""Secure aggregation by double masking with dropout recovery (Bonawitz et al. 2017, SecAgg+ style).

Each participant u encodes its example-weighted update as fixed-point integers and
adds, for every other participant v, a mask that v subtracts: u and v derive the
same seed from an X25519 key agreement (HKDF-SHA256 over the shared secret, bound
to the run, job and round), expand it with ChaCha20, and the one with the smaller
name adds while the other subtracts, modulo 2^64. Every mask cancels in the sum
over all participants, so the coordinator learns the sum and nothing else: each
masked update on the wire is indistinguishable from random words.

    encoded  = round(update * examples * 2^FRACTION_BITS)  (int64, as uint64)
    masked_u = encoded_u + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)   (mod 2^64)
    sum_u masked_u = sum_u encoded_u                                        (mod 2^64)

Dropout recovery: each round, before it trains, u draws a fresh self-mask seed b_u and
splits b_u and its mask private key s_u into t-of-n Shamir shares (meshctl.runtime.kernels
.shamir), one pair per participant, each sealed (ChaCha20-Poly1305) with the u-v pairwise
key, so the coordinator relays shares it cannot read. u's masked update also carries
PRG(b_u). Once the coordinator holds the masked updates of the survivors U (|U| >= t), each
survivor opens its shares and reveals b-shares of U and s-shares of the dropped D (never
both for one domain); the coordinator rebuilds b_u and s_d and removes the self masks of
U and the pairwise masks between U and D:

    masked_u = encoded_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)
    sum_{u in U} encoded_u = sum_U masked_u - sum_U PRG(b_u) -/+ sum_{u in U, d in D} PRG(s_ud)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FRACTION_BITS = 20
"""Fixed-point precision: 2^-20 of one example-weighted unit."""
MIN_PARTICIPANTS = 3
"""With two, each participant could subtract its own update from the aggregate it receives."""
LIMIT = 2.0**62
"""Encoded magnitudes must stay below this, so that sums of a few thousand cannot wrap."""


class EncodeError(ValueError):
    """An update too large (or not finite) to encode."""


def new_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the public half."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def encode(tensors: Sequence[torch.Tensor], weight: float) -> np.ndarray:
    """`tensors` flattened, times `weight`, as fixed-point uint64 words (two's complement)."""
    flat = torch.cat([t.detach().to(torch.float64).reshape(-1) for t in tensors]) * (weight * 2.0**FRACTION_BITS)
    if flat.numel() and (not bool(torch.isfinite(flat).all()) or float(flat.abs().max()) >= LIMIT):
        raise EncodeError("update too large (or not finite) for fixed-point secure aggregation")
    return flat.round().to(torch.int64).numpy().view(np.uint64)


def decode(total: np.ndarray, shapes: Sequence[Sequence[int]], divisor: float) -> list[torch.Tensor]:
    """The float32 tensors of `total / divisor` (total: summed uint64 words)."""
    values = torch.from_numpy(total.view(np.int64).astype(np.float64)) / (2.0**FRACTION_BITS * divisor)
    out, at = [], 0
    for shape in shapes:
        n = int(np.prod(shape)) if len(shape) else 1
        out.append(values[at:at + n].reshape(list(shape)).to(torch.float32))
        at += n
    return out


def _seed(key: X25519PrivateKey, peer: bytes, context: bytes) -> bytes:
    shared = key.exchange(X25519PublicKey.from_public_bytes(peer))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"meshctl secagg v1|" + context).derive(shared)


def _stream(seed: bytes, round_: int, count: int) -> np.ndarray:
    nonce = round_.to_bytes(16, "little")
    words = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(8 * count))
    return np.frombuffer(words, dtype=np.uint64)


def mask(encoded: np.ndarray, me: str, key: X25519PrivateKey, peers: Mapping[str, bytes],
         context: bytes, round_: int, self_seed: bytes | None = None) -> np.ndarray:
    """`encoded` plus this participant's pairwise masks with every other participant in `peers`
    (and its self mask PRG(`self_seed`), if given)."""
    out = encoded.copy()
    if self_seed is not None:
        out += _stream(self_seed, round_, len(encoded))
    for name in sorted(peers):
        if name == me:
            continue
        stream = _stream(_seed(key, peers[name], context), round_, len(encoded))
        if me < name:
            out += stream  # numpy uint64 arithmetic wraps modulo 2^64
        else:
            out -= stream
    return out


def add(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The sum modulo 2^64 of the parts."""
    total = np.zeros_like(parts[0])
    for p in parts:
        total += p
    return total


class RecoveryError(ValueError):
    """Shares or replies that cannot unmask a round."""


def threshold(participants: int, declared: int | None = None) -> int:
    """Shares needed to rebuild a seed: the declared threshold, else ceil(2n/3) (Flower's SecAgg+
    default fraction, 2/3), never below MIN_PARTICIPANTS."""
    return declared if declared is not None else max(MIN_PARTICIPANTS, math.ceil(2 * participants / 3))


def new_seed() -> bytes:
    """A fresh 32-byte self-mask seed b_u (one per round attempt)."""
    return os.urandom(32)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _share_key(key: X25519PrivateKey, peer: bytes, context: bytes) -> ChaCha20Poly1305:
    shared = key.exchange(X25519PublicKey.from_public_bytes(peer))
    return ChaCha20Poly1305(HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                                 info=b"meshctl secagg shares v1|" + context).derive(shared))


def seal(key: X25519PrivateKey, peer: bytes, context: bytes, label: bytes, plaintext: bytes) -> bytes:
    """`plaintext` sealed for `peer` with the pairwise key; `label` (sender, receiver, round, attempt)
    is authenticated, so a relayed ciphertext cannot be passed off as another pair's or round's."""
    nonce = os.urandom(12)
    return nonce + _share_key(key, peer, context).encrypt(nonce, plaintext, label)


def open_sealed(key: X25519PrivateKey, peer: bytes, context: bytes, label: bytes, sealed: bytes) -> bytes:
    """What `seal` sealed; RecoveryError when it was not sealed by `peer` for this label."""
    try:
        return _share_key(key, peer, context).decrypt(sealed[:12], sealed[12:], label)
    except (InvalidTag, ValueError):
        raise RecoveryError("a share that does not open with the pairwise key") from None


def unmask(total: np.ndarray, survivors: Sequence[str], self_seeds: Mapping[str, bytes],
           dropped_keys: Mapping[str, bytes], public: Mapping[str, bytes], context: bytes,
           round_: int) -> np.ndarray:
    """The sum of the survivors' encoded updates from `total` (the sum of their masked ones):
    minus each survivor's self mask (its rebuilt seed in `self_seeds`), and minus the pairwise
    masks each survivor shares with each dropped participant (its rebuilt private key in
    `dropped_keys`; `public`: every participant's public key)."""
    out = total.copy()
    for u in survivors:
        out -= _stream(self_seeds[u], round_, len(total))
    for d, raw in sorted(dropped_keys.items()):
        key = X25519PrivateKey.from_private_bytes(raw)
        if public_bytes(key) != public[d]:
            raise RecoveryError(f"the rebuilt mask key of {d} is not the one it announced")
        for u in survivors:
            stream = _stream(_seed(key, public[u], context), round_, len(total))
            if u < d:
                out -= stream  # u added the pair's mask
            else:
                out += stream
    return out


def context(run: str, job: str, attempt: int = 1) -> bytes:
    """What a job's pairwise keys are bound to: the run, the job, and a re-run round's attempt
    (attempt 2, ... gets masks and share keys no earlier attempt used)."""
    return (f"{run}|{job}" + (f"|{attempt}" if attempt > 1 else "")).encode()
