"""The archive query runs off Prosody's event loop: other clients are served while it is pending (mam_rs only)."""

import time

import pytest

QUERY_DELAY = 2  # seconds; mam_rs_test_query_delay makes every query sleep this long on its worker


def run_ping_race(srv, connect, n_pings=10):
    alice = connect(srv, "alice")
    bob = connect(srv, "bob")
    for i in range(5):
        alice.send_message("bob@localhost", "race %d" % i)
    bob.wait_body("race 4")

    qid, fut = alice.mam_async(fields={"with": "bob@localhost"}, rsm={"max": 10})
    time.sleep(0.3)  # let the query reach the server and start
    pings = [bob.ping(timeout=30)[0] for _ in range(n_pings)]
    reply = fut.result(60)
    return alice.mam_collect(qid, reply), pings


@pytest.mark.mam_rs_only
def test_pings_answered_while_query_pending(make_server, connect):
    srv = make_server(["mam_rs_test_query_delay = %d" % QUERY_DELAY])
    r, pings = run_ping_race(srv, connect)

    # The query completes correctly...
    assert r.iq.type == "result"
    assert r.bodies == ["race %d" % i for i in range(5)]
    assert r.complete and r.count == 5
    # ...and only after every one of bob's pings was answered.
    first_result = min(m.seq for m in r.messages)
    late = [i for i, p in enumerate(pings) if not (p.seq < first_result and p.seq < r.iq.seq)]
    assert not late, (
        "pings %r were answered only after alice's query had produced results: the query blocked the "
        "loop (or mam_rs_test_query_delay is not applied)" % late)
