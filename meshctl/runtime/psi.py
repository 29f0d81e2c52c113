"""Private set intersection: ECDH-PSI over X25519 (the `cryptography` library).

Each party hashes its ids to curve points, `H(id) = sha256(b"meshctl-psi/v1" + salt + id)`
with the top bit cleared (an RFC 7748 u-coordinate), and blinds them with a secret scalar
(`X25519PrivateKey.exchange`). Scalar multiplication on the x-line commutes,
`a·(b·P) = b·(a·P)`, so two parties that each apply their own secret to the other's
blinded points get equal values exactly for the ids they share, and learn nothing about
the others (decisional Diffie-Hellman).

With a leader L (the label owner, secret a) and members M (secret b each), per member:

1. M -> L: `request()`, M's points b·H(x), in a shuffled order;
2. L -> M: `answer(...)`, those reblinded a·b·H(x) in M's order, and L's own a·H(y) in L's
   shuffled order (the same list for every member);
3. M: `respond(...)`, reblinds L's list b·a·H(y), compares, and sends L the positions in
   L's list that it also holds;
4. L: `order(held)`, the positions held by every member, is the agreed row order; each
   party maps it to its own row indices with `rows(order)`.

Everything sent is a list of 32-byte strings or of ints (JSON header + raw frames on the
wire); the coordinator that relays it sees only blinded points. docs/psi.md says who
learns what.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

DOMAIN_TAG = b"meshctl-psi/v1"
"""Prefix of every hashed id: the protocol's name and version."""
POINT_BYTES = 32
"""Size of one point (an X25519 u-coordinate)."""


class PsiError(ValueError):
    """A PSI input or message that cannot be used (one line: what and why)."""


def hash_point(ident: str, salt: bytes) -> bytes:
    """`ident`'s curve point for this run's `salt`: sha256 of tag, salt and id, top bit cleared."""
    u = bytearray(hashlib.sha256(DOMAIN_TAG + salt + ident.encode()).digest())
    u[31] &= 0x7F
    return bytes(u)


def blind(points: Sequence[bytes], secret: bytes) -> list[bytes]:
    """`secret`·P for each point P (X25519 with `secret` as the clamped scalar).

    Raises PsiError on a point that is not 32 bytes or whose product is the all-zero
    point (a low-order point: a malformed or hostile peer message, never a hashed id).
    """
    key = X25519PrivateKey.from_private_bytes(secret)
    out: list[bytes] = []
    for i, p in enumerate(points):
        if not isinstance(p, bytes | bytearray | memoryview) or len(p) != POINT_BYTES:
            raise PsiError(f"point {i} is not {POINT_BYTES} bytes")
        try:
            out.append(key.exchange(X25519PublicKey.from_public_bytes(bytes(p))))
        except ValueError:
            raise PsiError(f"point {i} is a low-order point (the peer's message is malformed)") from None
    return out


def new_secret() -> bytes:
    """A fresh 32-byte blinding secret (os.urandom): one per party per run."""
    return os.urandom(POINT_BYTES)


def new_salt() -> bytes:
    """A fresh per-run salt (16 bytes): blinded values of two runs cannot be linked."""
    return os.urandom(16)


class _Party:
    """Ids, their hashed points, a secret and a private shuffle."""

    def __init__(self, ids: Sequence[str], salt: bytes, secret: bytes | None, role: str):
        ids = list(ids)
        seen: set[str] = set()
        for i, ident in enumerate(ids):
            if not isinstance(ident, str):
                raise PsiError(f"{role} id at row {i} is a {type(ident).__name__}, not a string")
            if ident in seen:
                raise PsiError(f"{role} id at row {i} appears twice: a join key must be unique")
            seen.add(ident)
        if secret is not None and len(secret) != POINT_BYTES:
            raise PsiError(f"{role} secret is {len(secret)} bytes, not {POINT_BYTES}")
        self._secret = secret if secret is not None else new_secret()
        self._perm = list(range(len(ids)))
        random.SystemRandom().shuffle(self._perm)
        self._points = [hash_point(ids[r], salt) for r in self._perm]

    def __len__(self) -> int:
        return len(self._perm)


class PsiMember(_Party):
    """A domain that holds features but not the label: learns only which of its rows are shared."""

    def __init__(self, ids: Sequence[str], salt: bytes, secret: bytes | None = None):
        super().__init__(ids, salt, secret, "member")
        self._requested: list[bytes] | None = None
        self._match: dict[int, int] = {}

    def request(self) -> list[bytes]:
        """Own ids, hashed and blinded, in a shuffled order (sent to the leader)."""
        if self._requested is None:
            self._requested = blind(self._points, self._secret)
        return list(self._requested)

    def respond(self, mine_reblinded: list[bytes], leader_blinded: list[bytes]) -> list[int]:
        """Positions in the leader's list that this member also holds (sent to the leader).

        `mine_reblinded`: the leader's answer to `request()`, in the same order.
        """
        if len(mine_reblinded) != len(self._perm):
            raise PsiError(f"leader answered {len(mine_reblinded)} points for the member's {len(self._perm)}")
        mine = {bytes(p): k for k, p in enumerate(mine_reblinded)}
        if len(mine) != len(mine_reblinded):
            raise PsiError("leader's answer repeats a point")
        theirs = blind(leader_blinded, self._secret)
        if len(set(theirs)) != len(theirs):
            raise PsiError("leader's list repeats a point")
        self._match = {j: self._perm[mine[p]] for j, p in enumerate(theirs) if p in mine}
        return sorted(self._match)

    def rows(self, order: list[int]) -> list[int]:
        """Own row indices for the leader positions in `order` (the agreed row order)."""
        missing = [j for j in order if j not in self._match]
        if missing:
            raise PsiError(f"agreed order names leader position {missing[0]}, which this member does not hold")
        return [self._match[j] for j in order]


class PsiLeader(_Party):
    """The label owner: answers each member and fixes the agreed order of the intersection."""

    def __init__(self, ids: Sequence[str], salt: bytes, secret: bytes | None = None):
        super().__init__(ids, salt, secret, "leader")
        self._blinded: list[bytes] | None = None

    def answer(self, member_blinded: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        """(the member's points reblinded, in the member's order; the leader's own blinded list).

        The leader's list is the same (same shuffle) for every member, so positions agree.
        """
        if self._blinded is None:
            self._blinded = blind(self._points, self._secret)
        return blind(member_blinded, self._secret), list(self._blinded)

    def order(self, held: dict[str, list[int]]) -> list[int]:
        """Leader positions held by every member (ascending): the agreed order of the intersection."""
        common = set(range(len(self._perm)))
        for name, positions in held.items():
            bad = [j for j in positions if not isinstance(j, int) or not 0 <= j < len(self._perm)]
            if bad:
                raise PsiError(f"member {name} names position {bad[0]!r}, outside the leader's {len(self._perm)}")
            common &= set(positions)
        return sorted(common)

    def rows(self, order: list[int]) -> list[int]:
        """The leader's row indices in that order."""
        return [self._perm[j] for j in order]


def intersect(parties: dict[str, Sequence[str]], leader: str, salt: bytes) -> dict[str, list[int]]:
    """The whole protocol in one process (tests, benchmark): each party's row indices, aligned.

    `parties` maps a name to its ids; `leader` names the label owner. Row k of every
    party's list is the same entity.
    """
    lead = PsiLeader(parties[leader], salt)
    members = {name: PsiMember(ids, salt) for name, ids in parties.items() if name != leader}
    held: dict[str, list[int]] = {}
    for name, m in members.items():
        reblinded, theirs = lead.answer(m.request())
        held[name] = m.respond(reblinded, theirs)
    order = lead.order(held)
    out = {leader: lead.rows(order)}
    out.update({name: m.rows(order) for name, m in members.items()})
    return out
