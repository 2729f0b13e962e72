"""Archive metadata, <metadata xmlns=urn:xmpp:mam:2/> (reference §2.3, §2.7, §5).

Stock: an iq-get/self handler only. Empty archive -> <metadata/> with no children; otherwise
<start id timestamp/> (oldest item) and <end id timestamp/> (newest), no filtering.
"""

import pytest

from conftest import NS_MAM, USERS, ProsodyServer, stamp_to_epoch

META_USERS = USERS + ("empty", "meta1", "meta2")
METADATA = "<metadata xmlns='urn:xmpp:mam:2'/>"


@pytest.fixture(scope="module")
def server():
    srv = ProsodyServer(users=META_USERS).start()
    yield srv
    srv.stop()


def metadata(client, to=None):
    """(start (id, timestamp) or None, end (id, timestamp) or None), checking the stock shape."""
    r = client.iq("get", METADATA, to=to)
    assert r.type == "result", "metadata iq failed: %r" % (r,)
    children = list(r.xml)
    assert len(children) == 1, [c.tag for c in children]
    m = children[0]
    assert m.tag == "{%s}metadata" % NS_MAM
    assert not m.attrib, m.attrib
    tags = [c.tag for c in m]
    out = {}
    for c in m:
        name = c.tag.split("}", 1)[-1]
        assert c.tag in ("{%s}start" % NS_MAM, "{%s}end" % NS_MAM), c.tag
        assert set(c.attrib) == {"id", "timestamp"}, c.attrib
        assert len(c) == 0 and not (c.text or "").strip()
        stamp_to_epoch(c.get("timestamp"))  # XEP-0082 UTC
        out[name] = (c.get("id"), c.get("timestamp"))
    assert tags in ([], ["{%s}start" % NS_MAM, "{%s}end" % NS_MAM]), tags
    return out.get("start"), out.get("end")


def test_empty_archive(server, connect):
    empty = connect(server, "empty")
    assert metadata(empty) == (None, None)


def test_start_and_end_match_full_query(server, connect):
    m1 = connect(server, "meta1")
    m2 = connect(server, "meta2")
    for i in range(5):
        mid = m1.send_message("meta2@localhost", "m1 to m2 %d" % i)
        m2.wait_id(mid)
    mid = m2.send_message("meta1@localhost", "m2 to m1")
    m1.wait_id(mid)

    for c in (m1, m2):
        full = c.mam_all()
        assert len(full.ids) == 6
        start, end = metadata(c)
        assert start == (full.ids[0], full.stamps[0])
        assert end == (full.ids[-1], full.stamps[-1])

    # The start stays, the end moves on
    start_before, _ = metadata(m1)
    mid = m1.send_message("meta2@localhost", "one more")
    m2.wait_id(mid)
    full = m1.mam_all()
    assert metadata(m1) == (start_before, (full.ids[-1], full.stamps[-1]))


def test_single_message_start_equals_end(server, connect):
    carol = connect(server, "carol")
    dave = connect(server, "dave")
    mid = carol.send_message("dave@localhost", "only one")
    dave.wait_id(mid)
    full = carol.mam_all()
    assert len(full.ids) == 1
    start, end = metadata(carol)
    assert start == end == (full.ids[0], full.stamps[0])


def test_metadata_to_own_bare_jid(server, connect):
    empty = connect(server, "empty")
    assert metadata(empty, to="empty@localhost") == (None, None)


def test_metadata_set_is_service_unavailable(server, connect):
    alice = connect(server, "alice")
    r = alice.iq("set", METADATA)
    assert r.type == "error", r
    assert (r.error_type, r.condition) == ("cancel", "service-unavailable"), r


def test_metadata_of_another_user_is_service_unavailable(server, connect):
    alice = connect(server, "alice")
    r = alice.iq("get", METADATA, to="meta1@localhost")
    assert r.type == "error", r
    assert (r.error_type, r.condition) == ("cancel", "service-unavailable"), r
