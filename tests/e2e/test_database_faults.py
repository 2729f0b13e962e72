"""Database faults on a real SQLite file (issue 6): Prosody keeps running and delivering, and
the admin gets one clear error per fault and one line when it clears. mod_mam_rs only (its own
database file).

- A corrupt file at start.
- Faults while clients chat, each on the real file Prosody has open:
  - locked: another process (a python sqlite3 connection) holds a write transaction;
  - disk full: the archive is on a small tmpfs of its own, mounted in a mount namespace of
    Prosody's own (so it goes away with Prosody), and the test fills it up. (SQLite's
    `max_page_count` cannot stand in: it is a setting of one connection, not of the file.)
    Skipped, saying why, where such a mount is not allowed;
  - read-only: `chattr +i` on the database and its WAL, on a filesystem that refuses writes
    to an immutable file even through descriptors opened before (ext4 does, tmpfs does not).
    The `-shm` index is left alone: it is memory-mapped, and on ext4 a write to an immutable
    mapping is SIGBUS, not an I/O error. (As root, chmod would change nothing.) Skipped, saying
    why, where no filesystem at hand enforces it.

  For each of them the test proves: messages are delivered while the fault lasts (and how long
  they were held is printed); Prosody answers pings; the log has one error line for the fault,
  naming the file and the cause, and one line when it clears; every stanza-id a client
  received is then in the archive, once, and nothing else from the fault is; and
  `mam_rs_max_queued_rows` is enforced to the row and reported once each way (messages beyond
  it are delivered without a stanza-id).
"""

import errno
import os
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import (NS_CLIENT, REPO, ProsodyServer, exchange, restart_server, stanza_ids,
                      stop_server_keep_data, token)

pytestmark = [pytest.mark.mam_rs_only, pytest.mark.sqlite_only]


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


# --------------------------------------------------------------------------
# Faults while clients chat

# Rows, not messages: a message between two local users is two rows (sender's and recipient's
# archive), so 8 messages fill the queue and the rest of SENT are delivered without a stanza-id.
MAX_QUEUED = 16
SENT = 16
INTERVAL = 0.5  # seconds between messages sent during the fault
FAULT_SECONDS = 12.0  # how long each fault lasts: several retries (two while locked), one line
WRITER_BUSY_TIMEOUT = 5.0  # SqliteOptions::busy_timeout: how long a commit waits for a lock
SLACK = 1.5  # scheduling noise allowed on a loaded 2-core machine
RECOVERY_TIMEOUT = 20.0  # retries back off to at most 5 s apart


class LogWatch:
    """Prosody's log from the moment this is made."""

    def __init__(self, srv):
        self.srv = srv
        self.offset = srv.log.stat().st_size

    def lines(self, level):
        text = self.srv.log.read_bytes()[self.offset:].decode(errors="replace")
        return [ln for ln in text.splitlines() if "\t%s\t" % level in ln]

    def wait_for(self, level, needle, timeout):
        deadline = time.monotonic() + timeout
        while True:
            found = [ln for ln in self.lines(level) if needle in ln]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def sid_for(msg, user):
    ids = [i for by, i in stanza_ids(msg) if by == user]
    assert len(ids) <= 1, ids
    return ids[0] if ids else None


def archive_bodies(client, with_jid, prefix):
    """[(body, id)] of client's archive with `with_jid`, oldest first, bodies starting `prefix`."""
    r = client.mam_all(fields={"with": with_jid})
    return [(b, i) for b, i in zip(r.bodies, r.ids) if b and b.startswith(prefix)]


def chat_through_fault(srv, connect, db, fault, cause, hold_limit, prompt_after=None):
    """alice sends SENT messages to bob while `fault` (with .start() and .clear()) lasts
    FAULT_SECONDS, then checks delivery, the archive, the queue bound and the log. `cause` must
    be in the fault's error line; every message must be delivered within `hold_limit` seconds,
    and those sent `prompt_after` seconds or later into the fault within SLACK. Returns the
    holds (seconds), in send order."""
    alice, bob, carol = connect(srv, "alice"), connect(srv, "bob"), connect(srv, "carol")
    tag = "fault %s " % token()
    before = exchange(alice, bob, tag + "before")
    assert sid_for(bob.wait_body(before), bob.bare), "archived normally before the fault"

    log = LogWatch(srv)
    fault.start()
    t0 = time.monotonic()
    try:
        sent = []  # (body, monotonic send time)
        for i in range(SENT):
            time.sleep(max(0.0, t0 + i * INTERVAL - time.monotonic()))
            body = tag + "during %02d" % i
            sent.append((body, time.monotonic()))
            alice.send_message(bob.bare, body)
        _, ping_rtt = carol.ping(timeout=SLACK + 1)
        # Delivered while the fault lasts, not once it clears.
        bodies = {b for b, _ in sent}
        got = bob.wait_messages(lambda x: x.findtext("{%s}body" % NS_CLIENT) in bodies, SENT,
                                timeout=max(0.0, t0 + FAULT_SECONDS - SLACK - time.monotonic()))
        assert len(got) == SENT, "only %d of %d messages delivered during the fault" % (len(got), SENT)
        assert srv.proc.poll() is None, "Prosody must keep running"
        time.sleep(max(0.0, t0 + FAULT_SECONDS - time.monotonic()))
        during = log.lines("error")
    finally:
        fault.clear()
    t_clear = time.monotonic()

    recovered = log.wait_for("info", "works again", RECOVERY_TIMEOUT)
    recovery_seconds = time.monotonic() - t_clear
    assert recovered, "no recovery line within %.0f s:\n%s" % (RECOVERY_TIMEOUT, srv.log_tail(30))

    received = {m.xml.findtext("{%s}body" % NS_CLIENT): m for m in got}
    holds = [received[b].t - t for b, t in sent]
    assert max(holds) <= hold_limit, "deliveries held up to %.2f s (limit %.1f s): %s" % (
        max(holds), hold_limit, ["%.2f" % h for h in holds])
    if prompt_after is not None:
        late = [h for (_, t), h in zip(sent, holds) if t - t0 >= prompt_after]
        assert late and max(late) <= SLACK, "still held after the first failure: %s" % (
            ["%.2f" % h for h in late],)

    # Archived during the fault: a prefix of what was sent, exactly MAX_QUEUED rows in all.
    bob_sids = [(b, sid_for(received[b].xml, bob.bare)) for b, _ in sent]
    with_sid = [(b, s) for b, s in bob_sids if s]
    assert bob_sids[:len(with_sid)] == with_sid, "stanza-ids are not a prefix: %r" % (bob_sids,)
    in_bob = archive_bodies(bob, alice.bare, tag + "during")
    in_alice = archive_bodies(alice, bob.bare, tag + "during")
    assert in_bob == with_sid, "bob's archive %r, stanza-ids he received %r" % (in_bob, with_sid)
    assert [b for b, _ in in_alice] == [b for b, _ in sent][:len(in_alice)], in_alice
    assert len(in_alice) + len(in_bob) == MAX_QUEUED, (
        "%d rows archived during the fault, mam_rs_max_queued_rows is %d" % (len(in_alice) + len(in_bob), MAX_QUEUED))
    assert len(set(i for _, i in in_bob)) == len(in_bob)

    # Archiving is back: the next message has a stanza-id, and it is in the archive.
    after = exchange(alice, bob, tag + "after")
    after_sid = sid_for(bob.wait_body(after), bob.bare)
    assert after_sid, "not archived after recovery"
    assert archive_bodies(bob, alice.bare, tag + "after") == [(after, after_sid)]
    assert log.wait_for("info", "caught up", 5), srv.log_tail(30)

    # One line each way, for the fault and for the queue bound; nothing else above info.
    db = str(db)
    errors = log.lines("error")
    assert errors == during, "error lines after the fault cleared: %r" % (errors[len(during):],)
    writes = [ln for ln in errors if "Could not write" in ln]
    bound = [ln for ln in errors if "mam_rs_max_queued_rows" in ln]
    assert len(writes) == 1 and len(bound) == 1 and len(errors) == 2, errors
    assert db in writes[0] and cause in writes[0], writes[0]
    assert str(MAX_QUEUED) in bound[0], bound[0]
    infos = log.lines("info")
    works = [ln for ln in infos if "works again" in ln]
    assert len(works) == 1 and db in works[0], works
    assert len([ln for ln in infos if "caught up" in ln]) == 1, infos
    assert log.lines("warn") == [], log.lines("warn")

    print("\n%s: held %.2f s max, %.2f s median (%s); ping during the fault %.3f s; writes "
          "resumed %.1f s after the fault cleared"
          % (fault.name, max(holds), statistics.median(holds), " ".join("%.2f" % h for h in holds),
             ping_rtt, recovery_seconds))
    print("  " + "\n  ".join(writes + bound + works))
    return holds


class Locked:
    """Another process holds the database's write lock (BEGIN EXCLUSIVE, as a backup or an
    admin's sqlite3 session might)."""

    name = "locked"

    def __init__(self, db):
        self.db = db
        self.conn = None

    def start(self):
        self.conn = sqlite3.connect(str(self.db), timeout=10, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def clear(self):
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None


def test_locked_database_file_holds_deliveries_at_most_the_busy_timeout(make_server, connect):
    srv = make_server(["mam_rs_max_queued_rows = %d" % MAX_QUEUED])
    db = srv.data / "mam_rs.sqlite"
    # Messages sent before the first commit attempt gives up wait for it; after that, none wait.
    chat_through_fault(srv, connect, db, Locked(db), "database is locked",
                       hold_limit=WRITER_BUSY_TIMEOUT + SLACK, prompt_after=WRITER_BUSY_TIMEOUT + 1.0)


# Disk full: the archive alone on a tmpfs of TINY_KIB, in Prosody's own mount namespace.
TINY_KIB = 2048


def can_mount_tmpfs_in_a_namespace():
    probe = Path(tempfile.mkdtemp(prefix="mam-e2e-mount-probe-"))
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            'mount -t tmpfs -o size=64k mam-e2e-probe "$0"', str(probe)],
                           capture_output=True, text=True, timeout=30)
        return r.returncode == 0, (r.stderr or r.stdout).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return False, str(e)
    finally:
        probe.rmdir()


class TinyFsServer(ProsodyServer):
    """Prosody in a mount namespace of its own, with mam_rs_database on a small tmpfs there.
    The test reaches that tmpfs through /proc/<pid>/root."""

    def __init__(self, extra_config=(), **kw):
        super().__init__(extra_config, **kw)
        self.tiny = self.workdir / "tiny"
        self.tiny.mkdir()
        self.db = self.tiny / "mam_rs.sqlite"
        self.extra_config.append('mam_rs_database = "%s"' % self.db)

    def command(self):
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs -o size=%dk,mode=0700 mam-e2e-tiny "$0" && exec "$@"' % TINY_KIB,
                str(self.tiny)] + super().command()

    def tiny_as_seen_here(self):
        return Path("/proc/%d/root%s" % (self.proc.pid, self.tiny))


class DiskFull:
    """Fills the archive's filesystem with a file, and removes it."""

    name = "disk full"

    def __init__(self, srv):
        self.srv = srv
        self.filler = None

    def start(self):
        tiny = self.srv.tiny_as_seen_here()
        assert (tiny / "mam_rs.sqlite").exists(), "the archive is not on the small filesystem"
        self.filler = tiny / "filler"
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for size in (1 << 16, 4096, 512, 1):
                chunk = b"\0" * size
                try:
                    while True:
                        os.write(fd, chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
        finally:
            os.close(fd)
        st = os.statvfs(tiny)
        assert st.f_bavail == 0, "the filesystem still has %d blocks free" % st.f_bavail

    def clear(self):
        if self.filler is not None:
            self.filler.unlink(missing_ok=True)  # gone with the namespace if Prosody died
            self.filler = None


def test_disk_full_is_one_error_messages_flow_and_queued_rows_are_written_after(connect):
    ok, why = can_mount_tmpfs_in_a_namespace()
    if not ok:
        pytest.skip("cannot mount a small tmpfs in a private mount namespace (needs root or "
                    "user namespaces): %s" % why)
    srv = TinyFsServer(["mam_rs_max_queued_rows = %d" % MAX_QUEUED]).start()
    try:
        chat_through_fault(srv, connect, srv.db, DiskFull(srv), "database or disk is full",
                           hold_limit=SLACK, prompt_after=0.0)
    finally:
        srv.stop()


# Read-only: chattr +i, where the filesystem enforces it on descriptors already open.

def immutable_capable_dir():
    """(a new directory, None) on a filesystem where `chattr +i` makes writes through an
    already open descriptor fail, or (None, why not)."""
    reasons = []
    for base in (os.environ.get("MAM_E2E_DISK_DIR"), "/var/tmp", str(REPO / "tests" / "e2e" / ".work")):
        if not base:
            continue
        try:
            os.makedirs(base, exist_ok=True)
            d = Path(tempfile.mkdtemp(prefix="mam-e2e-ro-", dir=base))
        except OSError as e:
            reasons.append("%s: %s" % (base, e))
            continue
        probe = d / "probe"
        fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
        refused = False
        try:
            os.write(fd, b"x")
            r = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, text=True)
            if r.returncode != 0:
                reasons.append("%s: chattr +i: %s" % (base, (r.stderr or r.stdout).strip()))
            else:
                try:
                    os.pwrite(fd, b"y", 0)
                    reasons.append("%s: writes to an immutable open file still succeed" % base)
                except PermissionError:
                    refused = True
        finally:
            subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
            os.close(fd)
            probe.unlink()
        if refused:
            return d, None
        d.rmdir()
    return None, "; ".join(reasons) or "no candidate directory"


class ReadOnly:
    """Makes the database file and its WAL immutable, and mutable again."""

    name = "read-only"

    def __init__(self, db):
        self.files = [str(db), str(db) + "-wal"]
        self.set = False

    def start(self):
        subprocess.run(["chattr", "+i", *self.files], check=True, capture_output=True)
        self.set = True

    def clear(self):
        if self.set:
            subprocess.run(["chattr", "-i", *self.files], check=True, capture_output=True)
            self.set = False


def test_read_only_file_is_one_error_messages_flow_and_queued_rows_are_written_after(connect):
    d, why = immutable_capable_dir()
    if d is None:
        pytest.skip("no filesystem here refuses writes to an immutable open file: %s" % why)
    db = d / "mam_rs.sqlite"
    fault, srv = ReadOnly(db), None
    try:
        srv = ProsodyServer(["mam_rs_max_queued_rows = %d" % MAX_QUEUED, 'mam_rs_database = "%s"' % db]).start()
        chat_through_fault(srv, connect, db, fault, "Operation not permitted",
                           hold_limit=SLACK, prompt_after=0.0)
    finally:
        fault.clear()
        if srv is not None:
            srv.stop()
        shutil.rmtree(d, ignore_errors=True)
