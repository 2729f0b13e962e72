"""Message expiry (archive_expires_after, archive_cleanup_interval; issue 8) on a real Prosody.

Stock 0.12 expires once a day (module:daily), so these run on mod_mam_rs only: short periods
make the schedule observable in seconds.
"""

import time

import pytest

from conftest import E2E_BACKEND, exchange, prosodyctl, token, wait_until

pytestmark = pytest.mark.mam_rs_only


def archived_bodies(client, with_jid):
    return client.mam_ok(fields={"with": with_jid}, rsm={"max": 50}).bodies



def test_expired_messages_go_on_schedule_and_newer_ones_stay(make_server, connect):
    srv = make_server(["archive_expires_after = 2", "archive_cleanup_interval = 1"])
    alice, bob = connect(srv, "alice"), connect(srv, "bob")
    old = [exchange(alice, bob, "old " + token()) for _ in range(3)]
    assert archived_bodies(alice, "bob@localhost") == old
    # Within a few cleanup intervals after they pass two seconds, both archives lose them.
    assert wait_until(lambda: archived_bodies(alice, "bob@localhost") == [])
    assert archived_bodies(bob, "alice@localhost") == []
    fresh = exchange(alice, bob, "fresh " + token())
    assert archived_bodies(alice, "bob@localhost") == [fresh], "a new message is kept until it is old"
    log = srv.log.read_text()
    assert "Deleted 3 expired messages" in log or "Deleted 6 expired messages" in log, "no expiry line in the log"
    alice.ping()  # the server is fine


def test_never_keeps_everything(make_server, connect):
    srv = make_server(['archive_expires_after = "never"', "archive_cleanup_interval = 1"])
    alice, bob = connect(srv, "alice"), connect(srv, "bob")
    body = exchange(alice, bob, "kept " + token())
    time.sleep(2.5)
    assert archived_bodies(alice, "bob@localhost") == [body]
    assert "expired messages" not in srv.log.read_text()


def test_unreadable_period_is_one_clear_error_and_archiving_still_works(make_server, connect):
    srv = make_server(['archive_expires_after = "forever"'])
    alice, bob = connect(srv, "alice"), connect(srv, "bob")
    body = exchange(alice, bob, "archived " + token())
    assert archived_bodies(alice, "bob@localhost") == [body]
    errors = [line for line in srv.log.read_text().splitlines() if "\terror\t" in line and "archive_expires_after" in line]
    assert len(errors) == 1 and '"forever"' in errors[0] and "expiry is disabled" in errors[0], errors


def test_writes_and_queries_go_on_while_a_large_expiry_runs(make_server, connect):
    """Expiry runs as short batches on the writer thread: messages archived and queries answered
    during it are not held up until it ends, and nothing queued is lost to it."""
    # Long enough for the burst below to be stored before any of it expires: a database
    # server (MAM_E2E_BACKEND) takes longer than the local file.
    expires = 3 if E2E_BACKEND == "sqlite" else 10
    srv = make_server(["archive_expires_after = %d" % expires, "archive_cleanup_interval = 1"])
    alice, bob = connect(srv, "alice"), connect(srv, "bob")
    burst = "".join(
        "<message to='bob@localhost' type='chat' id='x%d'><body>bulk %d</body></message>" % (i, i) for i in range(3000)
    )
    alice.send_raw(burst)
    alice.ping(timeout=120)
    assert alice.mam_ok(rsm={"max": 0}).count == 3000
    # Keep talking and querying across the moment those 3000 (x2 archives) expire.
    sent = []
    deadline = time.monotonic() + expires + 3
    while time.monotonic() < deadline:
        sent.append(exchange(alice, bob, "live " + token()))
        assert alice.mam_ok(rsm={"max": 5, "before": ""}).bodies[-1] == sent[-1]
    assert wait_until(lambda: "Deleted" in srv.log.read_text())
    # What is left is exactly the newest live messages: no bulk, no gap, in order. Expiry goes
    # on every second, taking the oldest live messages in turn: read the count and the oldest
    # page again until no run came between them.
    def left_now():
        return alice.mam_ok(fields={"with": "bob@localhost"}, rsm={"max": 0}).count

    for _ in range(20):
        left = left_now()
        first_page = archived_bodies(alice, "bob@localhost")
        if left_now() == left:
            break
    assert 1 <= left <= len(sent), "recent messages must survive"
    assert not any(b.startswith("bulk ") for b in first_page)
    assert first_page == sent[len(sent) - left:][:50]
    last_page = alice.mam_ok(fields={"with": "bob@localhost"}, rsm={"max": 50, "before": ""}).bodies
    assert last_page == sent[-min(50, left):]


def test_cleanup_command_removes_expired_messages_beside_a_running_server(make_server, connect):
    # The schedule is far away (first run after a minute): only the command removes anything.
    srv = make_server(["archive_expires_after = 1", "archive_cleanup_interval = 3600"])
    alice, bob = connect(srv, "alice"), connect(srv, "bob")
    for _ in range(3):
        exchange(alice, bob, "old " + token())
    time.sleep(1.5)
    fresh = exchange(alice, bob, "fresh " + token())
    r = prosodyctl(srv, "mod_mam_rs", "cleanup", "localhost")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "localhost: removed 6 expired messages" in r.stdout, r.stdout
    assert archived_bodies(alice, "bob@localhost") == [fresh]
    assert archived_bodies(bob, "alice@localhost") == [fresh]
    # Run again: nothing left to remove; the server kept running throughout.
    again = prosodyctl(srv, "mod_mam_rs", "cleanup")
    assert again.returncode == 0 and "localhost: removed 0 expired messages" in again.stdout, again.stdout
    alice.ping()


def test_cleanup_command_names_what_is_wrong(make_server):
    srv = make_server(['archive_expires_after = "never"'])
    unknown = prosodyctl(srv, "mod_mam_rs", "cleanup", "nosuch.example")
    assert unknown.returncode == 1 and 'No VirtualHost "nosuch.example"' in unknown.stdout, unknown.stdout
    never = prosodyctl(srv, "mod_mam_rs", "cleanup")
    assert never.returncode == 0 and "expiry is disabled" in never.stdout, never.stdout
    usage = prosodyctl(srv, "mod_mam_rs", "frobnicate")
    assert usage.returncode == 1 and 'Unknown command "frobnicate"' in usage.stdout, usage.stdout
    assert "cleanup [host]" in usage.stdout, usage.stdout


def test_cleanup_is_reported_on_prosodys_metrics_endpoint(connect):
    """The counters reach mod_http_openmetrics' /metrics, as an admin would scrape them."""
    import urllib.request

    from conftest import ModulesServer, _free_port

    http_port = _free_port()
    srv = ModulesServer(
        ["archive_expires_after = 1", "archive_cleanup_interval = 1", 'statistics = "internal"',
         'statistics_interval = "manual"', "http_ports = { %d }" % http_port, 'http_interfaces = { "127.0.0.1" }',
         'openmetrics_allow_cidr = "127.0.0.0/8"'],
        extra_modules=["http_openmetrics"]).start()
    try:
        alice, bob = connect(srv, "alice"), connect(srv, "bob")
        exchange(alice, bob, "metered " + token())

        def scrape():
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % http_port, timeout=5) as r:
                return r.read().decode()

        def counter(series):
            for line in scrape().splitlines():
                if line.startswith(series + " "):
                    return float(line.rsplit(" ", 1)[1])
            return None

        removed = 'prosody_mod_mam_rs__cleanup_removed_total{host="localhost",kind="expired"}'
        runs = 'prosody_mod_mam_rs__cleanup_runs_total{host="localhost",kind="expired",outcome="done"}'
        assert wait_until(lambda: (counter(removed) or 0) == 2), "cleanup_removed: %r" % counter(removed)
        assert counter(runs) >= 1
        assert counter('prosody_mod_mam_rs__cleanup_seconds_count{host="localhost"}') >= 1
    finally:
        srv.stop()
