"""Query filters: with (bare, full JID reduced), start/end (inclusive), RSM max, clamping, max=0 (reference §2.5, §2.6, §2.11)."""

import calendar
import time

import pytest

from conftest import STAMP_RE, stamp_to_epoch

GROUPS = {
    "A": [("A1", "bob"), ("A2", "carol"), ("A3", "bob")],
    "B": [("B1", "bob"), ("B2", "carol"), ("B3", "bob")],
    "C": [("C1", "bob"), ("C2", "carol"), ("C3", "bob")],
}
ALL = [body for g in "ABC" for body, _ in GROUPS[g]]


@pytest.fixture(scope="module")
def corpus(server, connect_module):
    """alice sends three groups of messages, more than one second apart (0.12 has 1 s resolution)."""
    alice = connect_module(server, "alice")
    bob = connect_module(server, "bob")
    carol = connect_module(server, "carol")
    peers = {"bob": bob, "carol": carol}
    for i, g in enumerate("ABC"):
        if i:
            time.sleep(1.2)
        for body, to in GROUPS[g]:
            alice.send_message(to + "@localhost", body)
        for body, to in GROUPS[g]:
            peers[to].wait_body(body)
    res = alice.mam_ok(rsm={"max": 50})
    assert res.bodies == ALL
    stamps = dict(zip(res.bodies, res.stamps))
    ids = dict(zip(res.bodies, res.ids))
    by_group = {g: [stamp_to_epoch(stamps[b]) for b, _ in GROUPS[g]] for g in "ABC"}
    assert max(by_group["A"]) < min(by_group["B"]) and max(by_group["B"]) < min(by_group["C"])
    return {"alice": alice, "bob": bob, "carol": carol, "stamps": stamps, "ids": ids}


def bodies_of(groups, to=None):
    return [b for g in groups for b, t in GROUPS[g] if to is None or t == to]


def b_start(c):
    return min((c["stamps"][b] for b in bodies_of("B")), key=stamp_to_epoch)


def b_end(c):
    return max((c["stamps"][b] for b in bodies_of("B")), key=stamp_to_epoch)


def test_with_bare_jid(corpus):
    r = corpus["alice"].mam_ok(fields={"with": "bob@localhost"})
    assert r.bodies == bodies_of("ABC", "bob")
    assert r.complete and r.count == 6


def test_with_full_jid_is_reduced_to_bare(corpus):
    r = corpus["alice"].mam_ok(fields={"with": "carol@localhost/some-resource"})
    assert r.bodies == bodies_of("ABC", "carol")
    assert r.complete and r.count == 3


def test_with_on_recipient_side(corpus):
    r = corpus["bob"].mam_ok(fields={"with": "alice@localhost"})
    assert r.bodies == bodies_of("ABC", "bob")
    r = corpus["carol"].mam_ok(fields={"with": "alice@localhost"})
    assert r.bodies == bodies_of("ABC", "carol")


def test_with_unknown_contact(corpus):
    r = corpus["alice"].mam_ok(fields={"with": "nobody@localhost"})
    assert r.messages == [] and r.complete and r.count == 0


def test_start(corpus):
    r = corpus["alice"].mam_ok(fields={"start": b_start(corpus)})
    assert r.bodies == bodies_of("BC")
    assert r.complete and r.count == 6


def test_end(corpus):
    r = corpus["alice"].mam_ok(fields={"end": b_end(corpus)})
    assert r.bodies == bodies_of("AB")
    assert r.complete and r.count == 6


def test_start_and_end(corpus):
    r = corpus["alice"].mam_ok(fields={"start": b_start(corpus), "end": b_end(corpus)})
    assert r.bodies == bodies_of("B")
    assert r.complete and r.count == 3


def test_start_end_and_with(corpus):
    r = corpus["alice"].mam_ok(fields={"with": "bob@localhost", "start": b_start(corpus), "end": b_end(corpus)})
    assert r.bodies == bodies_of("B", "bob")
    assert r.count == 2


def test_start_with_timezone_offset(corpus):
    # The same instant as b_start, written as local time at +02:00.
    secs = stamp_to_epoch(b_start(corpus))
    local = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs + 7200)) + "+02:00"
    r = corpus["alice"].mam_ok(fields={"start": local})
    assert r.bodies == bodies_of("BC")


def test_start_in_future_is_empty(corpus):
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    r = corpus["alice"].mam_ok(fields={"start": future})
    assert r.messages == [] and r.complete and r.count == 0
    assert r.first is None and r.last is None


def test_rsm_max(corpus):
    r = corpus["alice"].mam_ok(rsm={"max": 2})
    assert r.bodies == ["A1", "A2"]
    assert r.fin.get("complete") is None  # absent, never "false"
    assert r.count == 9
    assert r.first == corpus["ids"]["A1"] and r.last == corpus["ids"]["A2"]
    r2 = corpus["alice"].mam_ok(rsm={"max": 2, "after": r.last})
    assert r2.bodies == ["A3", "B1"]
    assert r2.count == 9  # count ignores after/before


def test_rsm_max_exact_fit_is_complete(corpus):
    r = corpus["alice"].mam_ok(fields={"with": "carol@localhost"}, rsm={"max": 3})
    assert r.bodies == bodies_of("ABC", "carol")
    assert r.complete


def test_max_zero(corpus):
    r = corpus["alice"].mam_ok(rsm={"max": 0})
    assert r.messages == []
    assert r.complete
    assert r.count == 9
    r = corpus["alice"].mam_ok(fields={"with": "carol@localhost"}, rsm={"max": 0})
    assert r.messages == [] and r.complete and r.count == 3


def test_stamps_are_utc_xep0082(corpus):
    for s in corpus["stamps"].values():
        assert STAMP_RE.match(s)
        assert abs(calendar.timegm(time.strptime(s[:19], "%Y-%m-%dT%H:%M:%S")) - time.time()) < 300


def test_max_above_limit_is_clamped(make_server, connect):
    srv = make_server(["max_archive_query_results = 10"])
    alice = connect(srv, "alice")
    bob = connect(srv, "bob")
    for i in range(15):
        alice.send_message("bob@localhost", "clamp %02d" % i)
    bob.wait_body("clamp 14")
    r = alice.mam_ok(rsm={"max": 100})
    assert r.bodies == ["clamp %02d" % i for i in range(10)]
    assert r.fin.get("complete") is None
    assert r.count == 15
    # The default page size (20) is clamped too.
    r = alice.mam_ok()
    assert len(r.messages) == 10 and r.count == 15 and not r.complete
    r2 = alice.mam_ok(rsm={"max": 100, "after": r.last})
    assert r2.bodies == ["clamp %02d" % i for i in range(10, 15)]
    assert r2.complete and r2.count == 15
