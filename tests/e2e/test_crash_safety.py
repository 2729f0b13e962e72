"""Crash safety: SIGKILL Prosody repeatedly under continuous message load.

Three sender -> recipient pairs send bursts as fast as flow control (a ping after each burst)
allows. At seeded random moments Prosody is SIGKILLed and restarted on the same data dir; the
clients reconnect and go on. At the end every archive is read in full and compared with what
the clients were shown:

  * every stanza-id a recipient received is in its archive, under that id, with that body
    (zero missing), and no message has two archive rows (zero duplicated);
  * archive order is delivery order, per pair;
  * a message in an archive that was never delivered must be in flight at a kill: sent in a
    killed epoch, after the last message delivered in that epoch, and such messages form a
    prefix of that epoch's undelivered tail (no gaps);
  * the same holds for the sender's archive, which also holds everything the recipient's does.

MAM_E2E_CRASH_SEED picks the RNG seed (kill delays).
"""

import os
import random
import signal
import threading
import time

import pytest

from conftest import E2E_BACKEND, HOST, MAM_MODULE, restart_server, stop_server_keep_data
from test_lifecycle import archive_of, burst, delivered, wait_delivered

PAIRS = (("alice", "bob"), ("carol", "dave"), ("erin", "frank"))
KILLS = 6
KILL_DELAY = (0.3, 2.0)
FINAL_RUN = 1.0  # seconds of traffic after the last restart
BURST = 10
SEED = int(os.environ.get("MAM_E2E_CRASH_SEED", "313"))


class BurstSender(threading.Thread):
    """Sends bursts of BURST messages, each followed by a ping it waits for, until stopped or the
    connection is gone. `sent` holds the bodies whose write was accepted, in order."""

    def __init__(self, client, to, prefix):
        super().__init__(daemon=True)
        self.client, self.to, self.prefix = client, to, prefix
        self.sent = []
        self.stopped = threading.Event()
        self.kill_expected = threading.Event()  # set just before SIGKILL: a lost connection is fine
        self.error = None

    def run(self):
        i = 0
        try:
            while not self.stopped.is_set():
                bodies = ["%s%05d" % (self.prefix, i + k) for k in range(BURST)]
                burst(self.client, self.to, bodies)  # raises once the connection is gone
                self.sent.extend(bodies)
                i += BURST
                fut = self.client.iq_async("get", "<ping xmlns='urn:xmpp:ping'/>", to=HOST)
                while not fut.done():
                    if self.stopped.is_set():
                        fut.cancel()
                        return
                    try:
                        fut.result(0.05)
                    except TimeoutError:
                        pass
        except Exception as e:
            if not (self.stopped.is_set() or self.kill_expected.is_set()):  # failed before the kill
                self.error = e

    def stop(self):
        self.stopped.set()
        self.join(10)
        assert not self.is_alive(), "sender thread did not stop"
        assert self.error is None, "sender failed before the kill: %r" % (self.error,)
        return self.sent


def check_archive(name, archive, epochs, delivered_sid, killed):
    """Checks one archive ([(body, id)]) against what was sent and delivered.

    epochs: [(sent bodies, delivered bodies)] per epoch; delivered_sid: {body: stanza-id} when
    the archive is the recipient's (the ids must match), else None. Returns
    (archived in flight, lost) counts. Raises AssertionError on a violation."""
    order = {b: (e, k) for e, (sent, _) in enumerate(epochs) for k, b in enumerate(sent)}
    bodies = [b for b, _ in archive]
    unknown = [b for b in bodies if b not in order]
    assert not unknown, "%s: archive rows never sent: %r" % (name, unknown[:5])
    dups = len(bodies) - len(set(bodies))
    assert dups == 0, "%s: %d messages archived more than once" % (name, dups)
    ids = [i for _, i in archive]
    assert len(set(ids)) == len(ids), "%s: an archive id is used twice" % name
    assert bodies == sorted(bodies, key=order.get), "%s: archive order is not send/delivery order" % name

    in_archive = dict(archive)
    missing = [b for _, dl in epochs for b in dl if b not in in_archive]
    assert not missing, "%s: %d delivered messages missing from the archive, first %r" % (
        name, len(missing), missing[:5])
    if delivered_sid is not None:
        wrong = [(b, s, in_archive[b]) for b, s in delivered_sid.items() if in_archive[b] != s]
        assert not wrong, "%s: %d delivered messages archived under another id, first %r" % (
            name, len(wrong), wrong[:5])

    in_flight = lost = 0
    for e, (sent, dl) in enumerate(epochs):
        tail, dl_set = sent[len(dl):], set(dl)
        extra = [b for b in bodies if order[b][0] == e and b not in dl_set]
        assert not extra or killed[e], "%s: epoch %d had no kill but archived undelivered %r" % (
            name, e, extra[:5])
        assert extra == tail[:len(extra)], (
            "%s: epoch %d: archived-but-undelivered messages are not the in-flight tail: %r, tail %r"
            % (name, e, extra[:5], tail[:5]))
        in_flight += len(extra)
        lost += len(tail) - len(extra)
    return in_flight, lost


# sqlite_tune "fast" (synchronous = OFF) fsyncs nothing: what a commit wrote is in the OS's
# hands only, which is enough for a process that dies (not for an OS that does).
@pytest.mark.parametrize("tune", [None, "fast"], ids=["default", "sqlite_tune_fast"])
def test_sigkill_under_load_loses_no_delivered_message(make_server, connect, tune):
    if tune and (E2E_BACKEND != "sqlite" or MAM_MODULE != "mam_rs"):
        pytest.skip("sqlite_tune is for mod_mam_rs's SQLite archive here")
    rng = random.Random(SEED)
    delays = [rng.uniform(*KILL_DELAY) for _ in range(KILLS)]
    srv = make_server(['sqlite_tune = "%s"' % tune] if tune else [])
    if tune:
        assert 'sqlite_tune "fast": synchronous = OFF' in srv.log_text(), srv.log_tail(30)
    # Per pair, per epoch: (sent bodies, [(body, stanza-id)] delivered).
    log = {s: [] for s, _ in PAIRS}
    killed = []
    t0 = time.monotonic()

    for epoch in range(KILLS + 1):
        rcpts = {r: connect(srv, r) for _, r in PAIRS}  # recipients first: nothing goes offline
        senders = {s: connect(srv, s) for s, _ in PAIRS}
        threads = {s: BurstSender(senders[s], rcpts[r].bare, "crash %s e%d " % (s, epoch)) for s, r in PAIRS}
        for t in threads.values():
            t.start()
        if epoch < KILLS:
            time.sleep(delays[epoch])
            for t in threads.values():
                t.kill_expected.set()
            stop_server_keep_data(srv, signal.SIGKILL)
            sent = {s: t.stop() for s, t in threads.items()}
            got = {s: delivered(rcpts[r], "crash %s e%d " % (s, epoch)) for s, r in PAIRS}
        else:
            time.sleep(FINAL_RUN)
            sent = {s: t.stop() for s, t in threads.items()}
            got = {s: wait_delivered(rcpts[r], "crash %s e%d " % (s, epoch), len(sent[s]), timeout=30)
                   for s, r in PAIRS}
        killed.append(epoch < KILLS)
        for s, _ in PAIRS:
            dl = [b for b, _ in got[s]]
            assert dl == sent[s][:len(dl)], (
                "epoch %d %s: delivery is not an in-order prefix of what was sent" % (epoch, s))
            assert all(sid for _, sid in got[s]), "epoch %d %s: delivered without a stanza-id" % (epoch, s)
            log[s].append((sent[s], got[s]))
        for c in list(rcpts.values()) + list(senders.values()):
            c.disconnect()
        if epoch < KILLS:
            restart_server(srv)
    load_time = time.monotonic() - t0

    rows = []
    for s, r in PAIRS:
        epochs = [(sent, [b for b, _ in got]) for sent, got in log[s]]
        final_sent, final_got = epochs[-1]
        assert final_got == final_sent, "%s: messages sent after the last restart were not all delivered" % s
        sids = {b: sid for _, got in log[s] for b, sid in got}
        assert len(set(sids.values())) == len(sids), "%s->%s: a stanza-id was handed out twice" % (s, r)
        rc, sc = connect(srv, r), connect(srv, s)
        r_arch = archive_of(rc, fields={"with": "%s@%s" % (s, HOST)})
        s_arch = archive_of(sc, fields={"with": "%s@%s" % (r, HOST)})
        r_flight, r_lost = check_archive("%s's archive" % r, r_arch, epochs, sids, killed)
        s_flight, s_lost = check_archive("%s's archive" % s, s_arch, epochs, None, killed)
        not_in_sender = {b for b, _ in r_arch} - {b for b, _ in s_arch}
        assert not not_in_sender, "in %s's archive but not the sender's: %r" % (r, sorted(not_in_sender)[:5])
        rows.append((s, r, sum(len(x) for x, _ in epochs), len(sids), len(r_arch), r_flight, r_lost,
                     len(s_arch), s_flight))

    print("\ncrash safety (MAM_MODULE=%s, sqlite_tune %s, seed %d, kills at %s s, load %.1f s):"
          % (srv.module, tune or "not set", SEED, ", ".join("%.2f" % d for d in delays), load_time))
    print("  pair          sent  delivered  rcpt-archive  in-flight-archived  lost  sender-archive  "
          "sender-in-flight")
    for s, r, n_sent, n_dl, n_ra, rf, rl, n_sa, sf in rows:
        print("  %-12s %5d  %9d  %12d  %18d  %4d  %14d  %16d" % (
            "%s>%s" % (s, r), n_sent, n_dl, n_ra, rf, rl, n_sa, sf))
    print("  missing 0, duplicated 0 (asserted)")
