"""t-of-n Shamir secret sharing over the prime field GF(2^521 - 1), for 32-byte secrets.

A secret s becomes the constant term of a random polynomial f of degree t - 1; share i is
(i, f(i)) for i = 1..n. Any t shares give s back by Lagrange interpolation at 0; fewer
reveal nothing about it (every secret fits them equally well).

    f(x) = s + a_1 x + ... + a_{t-1} x^{t-1}   (mod p),  a_k uniform in [0, p)
    s    = sum_j y_j prod_{m != j} x_m / (x_m - x_j)   (mod p)
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

PRIME = 2**521 - 1
"""A Mersenne prime: the field holds every 32-byte secret."""
SHARE_BYTES = 66
"""Bytes of one share's value (big-endian, below PRIME)."""


class ShamirError(ValueError):
    """Shares that cannot give a secret back (too few, repeated or out of range)."""


def split(secret: bytes, n: int, t: int, *, prime: int = PRIME,
          randbelow: Callable[[int], int] = secrets.randbelow) -> list[tuple[int, int]]:
    """`n` shares (x, y), x = 1..n, of `secret`, any `t` of which give it back."""
    if not 1 <= t <= n:
        raise ShamirError(f"threshold {t} must be between 1 and the {n} shares")
    s = int.from_bytes(secret, "big")
    if s >= prime:
        raise ShamirError("secret too large for the field")
    coefficients = [s] + [randbelow(prime) for _ in range(t - 1)]
    return [(x, _evaluate(coefficients, x, prime)) for x in range(1, n + 1)]


def reconstruct(shares: Sequence[tuple[int, int]], t: int, size: int = 32, *, prime: int = PRIME) -> bytes:
    """The `size`-byte secret from at least `t` shares (the first t distinct ones are used)."""
    points = dict(shares)
    if len(points) != len(shares) or any(not 0 < x < prime or not 0 <= y < prime for x, y in shares):
        raise ShamirError("shares repeat an index or lie outside the field")
    if len(points) < t:
        raise ShamirError(f"{len(points)} share(s), the threshold is {t}")
    xs = sorted(points)[:t]
    secret = 0
    for j in xs:
        num, den = 1, 1
        for m in xs:
            if m != j:
                num = num * m % prime
                den = den * (m - j) % prime
        secret = (secret + points[j] * num * pow(den, -1, prime)) % prime
    if secret >= 256**size:
        raise ShamirError("the shares do not belong to one secret of that size")
    return secret.to_bytes(size, "big")


def _evaluate(coefficients: Sequence[int], x: int, prime: int) -> int:
    y = 0
    for c in reversed(coefficients):  # Horner
        y = (y * x + c) % prime
    return y
