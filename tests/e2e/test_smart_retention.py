"""Smart retention (issue 8; prosody-modules' mod_mam_smart_retention) on a real Prosody.

A message is removed once it has reached one (or all) of the user's known clients, through
live delivery or a MAM query, and is older than smart_retention_min. A message no client has
received is never removed. mod_mam_rs only: stock 0.12 has no smart retention.
"""

import time

import pytest

from conftest import exchange, token

pytestmark = pytest.mark.mam_rs_only

SMART = ["smart_retention_min = 1", "archive_cleanup_interval = 1", 'archive_expires_after = "never"']


def count(client, with_jid):
    return client.mam_ok(fields={"with": with_jid}, rsm={"max": 0}).count


def eventually(pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.25)
    return pred()


def test_one_removes_what_a_client_received_and_keeps_what_none_did(make_server, connect):
    srv = make_server(SMART + ['smart_retention_strategy = "one"'])
    bob = connect(srv, "bob")
    # Alice is offline: these reach no client of hers.
    for _ in range(3):
        bob.send_message("alice@localhost", "while away " + token())
    bob.ping()
    time.sleep(3)  # Several cleanup runs, and older than the minimum.
    phone = connect(srv, "alice", "phone")
    assert count(phone, "bob@localhost") == 3, "messages no client received are kept"
    # Now live, to the phone.
    for _ in range(2):
        exchange(bob, phone, "live " + token())
    # The phone's query fetched the first three; everything has reached the phone now.
    assert eventually(lambda: count(phone, "bob@localhost") == 0)
    assert "Deleted" in srv.log.read_text() and "delivered messages" in srv.log.read_text()


def test_all_waits_for_every_known_client(make_server, connect):
    srv = make_server(SMART + ['smart_retention_strategy = "all"'])
    bob = connect(srv, "bob")
    laptop = connect(srv, "alice", "laptop")
    phone = connect(srv, "alice", "phone")
    exchange(bob, phone, "to both " + token())  # Both devices are online: both have it.
    assert eventually(lambda: count(phone, "bob@localhost") == 0), "delivered to every client"
    laptop.disconnect()
    time.sleep(0.5)
    kept = [exchange(bob, phone, "phone only " + token()) for _ in range(2)]
    time.sleep(3)
    # The laptop is known (seen recently) and has not got these: kept.
    assert phone.mam_ok(fields={"with": "bob@localhost"}).bodies == kept
    # The laptop comes back and syncs through MAM: now every client has them.
    laptop = connect(srv, "alice", "laptop")
    assert laptop.mam_ok(fields={"with": "bob@localhost"}).bodies == kept
    assert eventually(lambda: count(laptop, "bob@localhost") == 0)


def test_off_unless_configured(make_server, connect):
    srv = make_server(["archive_cleanup_interval = 1", 'archive_expires_after = "never"'])
    bob, alice = connect(srv, "bob"), connect(srv, "alice")
    body = exchange(bob, alice, "kept " + token())
    time.sleep(2.5)
    assert alice.mam_ok(fields={"with": "bob@localhost"}).bodies == [body]
