"""ECDH-PSI over X25519 (issue 15): the result is the set intersection, nothing a party sends
carries an id, a hash of an id or its unblinded point, runs with different salts cannot be
linked, and a member learns exactly the intersection."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from meshctl.runtime import psi


def _ids(lo: int, hi: int, step: int = 1) -> list[str]:
    return [f"patient-{i:05d}" for i in range(lo, hi, step)]


def _run(parties: dict[str, list[str]], leader: str, salt: bytes, transcript: list[bytes] | None = None):
    """The protocol message by message, recording every byte string any party sends."""
    lead = psi.PsiLeader(parties[leader], salt)
    members = {n: psi.PsiMember(ids, salt) for n, ids in parties.items() if n != leader}
    sent: list[bytes] = [] if transcript is None else transcript
    held = {}
    for name, m in members.items():
        req = m.request()
        sent += req
        reblinded, theirs = lead.answer(req)
        sent += reblinded + theirs
        held[name] = m.respond(reblinded, theirs)
        sent += [str(held[name]).encode()]
    order = lead.order(held)
    sent += [str(order).encode()]
    rows = {leader: lead.rows(order), **{n: m.rows(order) for n, m in members.items()}}
    return rows, members, lead


def _check(parties: dict[str, list[str]], leader: str = "L") -> dict[str, list[int]]:
    rows, _, _ = _run(parties, leader, os.urandom(16))
    common = set.intersection(*(set(ids) for ids in parties.values()))
    aligned = {n: [parties[n][r] for r in rows[n]] for n in parties}
    first = aligned[leader]
    assert set(first) == common and len(first) == len(common)
    for n in parties:
        assert aligned[n] == first, f"{n} is not aligned with the leader"
    return rows


@pytest.mark.parametrize("parties", [
    {"L": _ids(0, 300), "M": _ids(200, 500)},                 # overlapping
    {"L": _ids(0, 100), "M": _ids(100, 200)},                 # disjoint
    {"L": _ids(0, 150), "M": list(reversed(_ids(0, 150)))},   # identical, other row order
    {"L": _ids(0, 50), "M": []},                              # one empty
    {"L": [], "M": _ids(0, 50)},                              # the leader empty
    {"L": _ids(0, 400), "M": _ids(100, 500), "N": _ids(0, 600, 3)},  # three parties
], ids=["overlap", "disjoint", "identical", "member-empty", "leader-empty", "three"])
def test_result_is_the_set_intersection(parties):
    _check(parties)


def test_transcript_carries_no_id_hash_or_unblinded_point():
    parties = {"L": _ids(0, 200), "M": _ids(100, 300), "N": _ids(50, 250)}
    salt = os.urandom(16)
    transcript: list[bytes] = []
    _run(parties, "L", salt, transcript)
    blob = b"".join(transcript)
    every = {i for ids in parties.values() for i in ids}
    for ident in every:
        for secret in (ident.encode(), hashlib.sha256(ident.encode()).digest(),
                       hashlib.sha256(psi.DOMAIN_TAG + salt + ident.encode()).digest(),
                       psi.hash_point(ident, salt)):
            assert secret not in blob
    assert all(len(t) == psi.POINT_BYTES for t in transcript if not t.startswith(b"["))


def test_runs_with_different_salts_are_unlinkable():
    ids = _ids(0, 300)
    a = psi.PsiMember(ids, os.urandom(16), secret=b"\x01" * 32).request()
    b = psi.PsiMember(ids, os.urandom(16), secret=b"\x01" * 32).request()
    assert not set(a) & set(b), "the same ids and secret under two salts gave a shared blinded value"
    same = psi.PsiMember(ids, b"salt", secret=b"\x01" * 32).request()
    assert set(same) == set(psi.PsiMember(ids, b"salt", secret=b"\x01" * 32).request())


def test_a_member_learns_exactly_the_intersection():
    leader_ids, member_ids = _ids(0, 300), _ids(250, 400)
    salt = os.urandom(16)
    lead = psi.PsiLeader(leader_ids, salt)
    m = psi.PsiMember(member_ids, salt)
    reblinded, theirs = lead.answer(m.request())
    positions = m.respond(reblinded, theirs)
    # what the member can tell: which of its own rows matched, and the leader's list size
    matched = {member_ids[r] for r in m.rows(positions)}
    assert matched == set(leader_ids) & set(member_ids)
    assert len(theirs) == len(leader_ids)
    # the leader's list is blinded with a secret the member lacks: its own secret alone
    # gives points that match none of its own hashed ids
    mine = set(psi.blind([psi.hash_point(i, salt) for i in member_ids], m._secret))
    assert not mine & set(theirs)


def test_commutative_blinding_matches_the_cryptography_library():
    a, b = os.urandom(32), os.urandom(32)
    p = psi.hash_point("x", b"s")
    ab = psi.blind(psi.blind([p], a), b)[0]
    ba = psi.blind(psi.blind([p], b), a)[0]
    assert ab == ba
    direct = X25519PrivateKey.from_private_bytes(b).exchange(
        X25519PublicKey.from_public_bytes(X25519PrivateKey.from_private_bytes(a).exchange(
            X25519PublicKey.from_public_bytes(p))))
    assert ab == direct
    assert p[31] & 0x80 == 0


def test_duplicate_ids_and_bad_points_are_refused_in_one_line():
    with pytest.raises(psi.PsiError, match="row 2 appears twice: a join key must be unique"):
        psi.PsiMember(["a", "b", "a"], b"s")
    with pytest.raises(psi.PsiError, match="appears twice"):
        psi.PsiLeader(["a", "a"], b"s")
    lead = psi.PsiLeader(["a"], b"s")
    with pytest.raises(psi.PsiError, match="low-order point"):
        lead.answer([bytes(32)])  # the all-zero point: exchange gives zero
    with pytest.raises(psi.PsiError, match="not 32 bytes"):
        lead.answer([b"short"])
    with pytest.raises(psi.PsiError, match="outside the leader's"):
        lead.order({"M": [5]})
    m = psi.PsiMember(["a"], b"s")
    with pytest.raises(psi.PsiError, match="does not hold"):
        m.rows([0])
    mine, theirs = lead.answer(m.request())
    with pytest.raises(psi.PsiError, match="leader's list repeats a point"):
        m.respond(mine, theirs * 2)
    with pytest.raises(psi.PsiError, match="answered 2 points for the member's 1"):
        m.respond(mine * 2, theirs)


def test_intersect_helper_aligns_rows():
    parties = {"L": _ids(0, 100), "M": _ids(50, 150)}
    rows = psi.intersect(parties, "L", b"salt")
    assert [parties["L"][r] for r in rows["L"]] == [parties["M"][r] for r in rows["M"]]
    assert len(rows["L"]) == 50
