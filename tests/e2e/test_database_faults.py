"""Database faults on a real SQLite file (issue 6, in part): Prosody keeps running and
delivering, and the admin gets one clear error. mod_mam_rs only (its own database file).

Covered here: a corrupt file at start. The writer's retry-and-release behaviour on a failing
database is covered in tests/engine.rs with a store that fails on demand.
"""

import pytest

from conftest import ProsodyServer, exchange, restart_server, stop_server_keep_data, token

pytestmark = pytest.mark.mam_rs_only


def test_corrupt_database_at_start_is_one_clear_error_and_messages_still_flow(connect):
    srv = ProsodyServer([]).start()
    try:
        stop_server_keep_data(srv)
        db = srv.data / "mam_rs.sqlite"
        for leftover in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            if leftover.exists():
                leftover.unlink()
        db.write_bytes(b"this is not a database" * 100)
        log_start = srv.log.stat().st_size
        restart_server(srv, check_module=False)
        assert srv.proc.poll() is None, "Prosody must keep running"
        with open(srv.log, errors="replace") as f:
            f.seek(log_start)
            errors = [line for line in f if "\terror\t" in line]
        assert len(errors) == 1, errors
        assert "mam_rs.sqlite" in errors[0] and "file is not a database" in errors[0], errors[0]
        # Without an archive, chat goes on, and MAM is simply not offered.
        alice, bob = connect(srv, "alice"), connect(srv, "bob")
        body = exchange(alice, bob, "still delivered " + token())
        assert body
        r = alice.mam()
        assert r.iq.type == "error" and r.iq.condition == "service-unavailable", r.iq
        assert db.read_bytes().startswith(b"this is not a database"), "the file is left for the admin"
    finally:
        srv.stop()
