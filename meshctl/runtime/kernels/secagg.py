"""Secure aggregation by pairwise masking (Bonawitz et al. 2017, without dropout recovery).

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

If a participant drops out of a round its masks cannot be removed (this version
has no recovery), so the round cannot be aggregated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
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
         context: bytes, round_: int) -> np.ndarray:
    """`encoded` plus this participant's pairwise masks with every other participant in `peers`."""
    out = encoded.copy()
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
