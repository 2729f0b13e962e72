"""Paging through 1,000 archived messages with RSM after/before and flip-page (reference §2.5, §2.6)."""

import pytest

from conftest import NS_CLIENT, xml_escape

N = 1000
BODIES = ["page-%04d" % i for i in range(N)]


@pytest.fixture(scope="module")
def paged(server, connect_module):
    alice = connect_module(server, "alice")
    bob = connect_module(server, "bob")
    for start in range(0, N, 100):
        chunk = "".join(
            "<message to='bob@localhost' type='chat' id='pg%d'><body>%s</body></message>" % (i, xml_escape(BODIES[i]))
            for i in range(start, min(start + 100, N))
        )
        alice.send_raw(chunk)
        alice.ping(timeout=60)  # flow control: the server has processed the chunk
    got = bob.wait_messages(lambda x: (x.findtext("{%s}body" % NS_CLIENT) or "").startswith("page-"), N, timeout=120)
    assert len(got) == N, "bob received %d of %d" % (len(got), N)
    return alice, bob


def check_page(r, size):
    assert r.iq.type == "result"
    assert r.count == N
    bodies = r.bodies
    assert len(bodies) <= size
    assert bodies == sorted(bodies), "page not chronological"
    if bodies:
        assert r.first == r.ids[0] and r.last == r.ids[-1]
    return bodies


def test_default_page_size_is_20(paged):
    alice, _ = paged
    r = alice.mam_ok()
    assert r.bodies == BODIES[:20]
    assert not r.complete and r.count == N


@pytest.mark.parametrize("size", [50, 37])
def test_forward_paging(paged, size):
    alice, _ = paged
    bodies, ids, after, pages = [], [], None, 0
    while True:
        rsm = {"max": size}
        if after is not None:
            rsm["after"] = after
        r = alice.mam_ok(rsm=rsm)
        pages += 1
        page = check_page(r, size)
        bodies += page
        ids += r.ids
        if r.complete:
            break
        assert len(page) == size
        after = r.last
        assert pages < 100
    assert pages == -(-N // size)
    assert bodies == BODIES  # in order, no gap, no duplicate
    assert len(set(ids)) == N


@pytest.mark.parametrize("size", [50, 37])
def test_backward_paging(paged, size):
    alice, _ = paged
    pages_bodies, ids, before = [], [], ""
    while True:
        r = alice.mam_ok(rsm={"max": size, "before": before})
        page = check_page(r, size)
        pages_bodies.insert(0, page)
        ids += r.ids
        if r.complete:
            break
        assert len(page) == size
        before = r.first
        assert len(pages_bodies) < 100
    assert len(pages_bodies) == -(-N // size)
    # The first (newest) page ends at the newest message; the last page starts at the oldest.
    assert pages_bodies[-1][-1] == BODIES[-1]
    assert [b for p in pages_bodies for b in p] == BODIES
    assert len(set(ids)) == N


def test_backward_first_page_is_newest(paged):
    alice, _ = paged
    r = alice.mam_ok(rsm={"max": 10, "before": ""})
    assert r.bodies == BODIES[-10:]
    assert not r.complete


def test_flip_page_forward(paged):
    alice, _ = paged
    plain = alice.mam_ok(rsm={"max": 10})
    r = alice.mam_ok(rsm={"max": 10}, flip_page=True)
    assert r.bodies == list(reversed(BODIES[:10]))
    assert r.ids == list(reversed(plain.ids))
    # first/last stay chronological
    assert r.first == plain.first and r.last == plain.last
    assert not r.complete and r.count == N


def test_flip_page_backward(paged):
    alice, _ = paged
    plain = alice.mam_ok(rsm={"max": 10, "before": ""})
    r = alice.mam_ok(rsm={"max": 10, "before": ""}, flip_page=True)
    assert r.bodies == list(reversed(BODIES[-10:]))
    assert r.first == plain.first and r.last == plain.last


def test_after_and_before_ids_in_form(paged):
    alice, _ = paged
    ref = alice.mam_ok(rsm={"max": 20})
    ids = ref.ids
    r = alice.mam_ok(fields={"after-id": ids[4], "before-id": ids[10]})
    assert r.bodies == BODIES[5:10]
    assert r.complete
    # RSM after wins over the form's after-id
    r = alice.mam_ok(fields={"after-id": ids[4]}, rsm={"max": 3, "after": ids[14]})
    assert r.bodies == BODIES[15:18]


def test_ids_field(paged):
    alice, _ = paged
    ids = alice.mam_ok(rsm={"max": 10}).ids
    r = alice.mam_ok(fields={"ids": [ids[7], ids[3]]})
    assert r.bodies == [BODIES[3], BODIES[7]]  # archive order, not request order
    assert r.complete and r.count == 2


def test_recipient_archive_has_all(paged):
    _, bob = paged
    r = bob.mam_ok(fields={"with": "alice@localhost"}, rsm={"max": 0})
    assert r.count == N and r.complete
    r = bob.mam_ok(fields={"with": "alice@localhost"}, rsm={"max": 5, "before": ""})
    assert r.bodies == BODIES[-5:]
