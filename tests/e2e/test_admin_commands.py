"""prosodyctl mod_mam_rs info / user_stats / export / import --file / delete_user_data / optimize,
their argument errors, and in-band account deletion (Prosody's user-deleted event).

Every command runs as an admin would run it: `prosodyctl --config <cfg> mod_mam_rs ...` beside
the running server. Exit status 0 on success, 1 on any error with a message naming what is wrong.
"""

import json
import math
import re
import time
import xml.etree.ElementTree as ET

import pytest

from conftest import (
    wait_until,
    NS_CLIENT, NS_DELAY, NS_FORWARD, NS_MAM, Client, StorageServer, exchange, prosodyctl, stamp_to_epoch,
    stored_prefs_sql, token,
)

pytestmark = pytest.mark.mam_rs_only

HOST = "localhost"
EMPTY = "empty.localhost"  # mam_rs loaded, nothing archived
NOMAM = "nomam.localhost"  # a VirtualHost without mam_rs (modules_disabled)
NS_PIE = "urn:xmpp:pie:0"
NS_PIE_MAM = "urn:xmpp:pie:0#mam"

# alice -> bob 5, bob -> alice 3, alice -> carol 2: alice 10 (bob 8, carol 2), bob 8, carol 2.
PLAN = [("alice", "bob")] * 2 + [("bob", "alice")] + [("alice", "bob")] * 2 + [("alice", "carol")] \
    + [("bob", "alice")] * 2 + [("alice", "bob"), ("alice", "carol")]
PAYLOAD = "<thread>t-1</thread><x xmlns='urn:example:e2e' note='a&amp;b &lt;c&gt; ü'><y>ü &amp; z</y></x>"

INFO_RE = re.compile(r"^(\S+): (\d+) users, (\d+) messages, (\d+) bytes, oldest (\S+), newest (\S+)$")
STATS_RE = re.compile(r"^(\S+): (\d+) messages, (\d+) bytes, oldest (\S+), newest (\S+)$")



def ctl(srv, *args, timeout=120):
    return prosodyctl(srv, "mod_mam_rs", *args, timeout=timeout)


def ok(r):
    assert r.returncode == 0, "exit %d\n%s\n--- stderr ---\n%s" % (r.returncode, r.stdout, r.stderr)
    return r


def lines(text):
    """Output lines, with \\r-rewritten progress reduced to its final state."""
    return [ln.rsplit("\r", 1)[-1] for ln in text.split("\n") if ln.rsplit("\r", 1)[-1].strip()]


def norm(el):
    return (el.tag, tuple(sorted(el.attrib.items())), el.text or "", tuple(norm(c) for c in el), el.tail or "")


def bare(j):
    return (j or "").split("/", 1)[0]


def snapshot(client):
    """(ids, bodies, stamps, normalised messages, from-attrs, to-attrs) of a whole archive."""
    r = client.mam_all()
    return dict(ids=r.ids, bodies=r.bodies, stamps=r.stamps, norms=[norm(m) for m in r.forwarded],
                froms=[m.get("from") for m in r.forwarded], tos=[m.get("to") for m in r.forwarded])


def same_second(stamp, epoch):
    return stamp != "-" and math.floor(stamp_to_epoch(stamp)) == math.floor(epoch)


def prefs_xml(default, always=(), never=()):
    return "<prefs xmlns='urn:xmpp:mam:2' default='%s'><always>%s</always><never>%s</never></prefs>" % (
        default, "".join("<jid>%s</jid>" % j for j in always), "".join("<jid>%s</jid>" % j for j in never))


def get_prefs(client):
    r = client.iq("get", "<prefs xmlns='urn:xmpp:mam:2'/>")
    assert r.type == "result", r
    p = r.xml.find("{%s}prefs" % NS_MAM)
    lists = [sorted(j.text for j in p.find("{%s}%s" % (NS_MAM, name)).findall("{%s}jid" % NS_MAM))
             for name in ("always", "never")]
    return p.get("default"), lists[0], lists[1]


def set_prefs(client, default, always=(), never=()):
    r = client.iq("set", prefs_xml(default, always, never))
    assert r.type == "result", r


# --------------------------------------------------------------------------
# A populated server: three hosts, one of them without mam_rs


@pytest.fixture(scope="module")
def populated(loop_thread):
    srv = StorageServer(users=("alice", "bob", "carol", "dave"), hosts=(HOST, EMPTY),
                        trailing=['VirtualHost "%s"' % NOMAM, '\tmodules_disabled = { "mam_rs" }']).start()
    clients = {u: Client(loop_thread, srv, u).connect() for u in ("alice", "bob", "carol")}
    try:
        for n, (a, b) in enumerate(PLAN):
            if n == len(PLAN) - 1:  # the newest message in a later second than the oldest
                later = int(time.time()) + 1.05  # past the next second on the server's coarse clock too
                while time.time() < later:
                    time.sleep(0.01)
            body = "%d %s→%s & <b>x</b> > ünïcødé ☃ 日本 😀 %s" % (n, a, b, token())
            mid = clients[a].send_message(clients[b].bare, body, payload=PAYLOAD if n % 3 == 0 else "")
            clients[b].wait_id(mid)
        snaps = {u: snapshot(c) for u, c in clients.items()}
        assert [len(snaps[u]["ids"]) for u in ("alice", "bob", "carol")] == [10, 8, 2]
        yield srv, clients, snaps
    finally:
        for c in clients.values():
            c.disconnect()
        srv.stop()


# --------------------------------------------------------------------------
# info, user_stats


def test_info_one_line_per_mam_rs_host(populated):
    srv, _, snaps = populated
    stamps = [stamp_to_epoch(s) for snap in snaps.values() for s in snap["stamps"]]
    r = ok(ctl(srv, "info"))
    out = lines(r.stdout)
    parsed = {m.group(1): m.groups()[1:] for m in map(INFO_RE.match, out) if m}
    assert sorted(parsed) == [EMPTY, HOST], "want one info line for each of %s, %s; got:\n%s" % (HOST, EMPTY, r.stdout)
    assert NOMAM not in r.stdout, "a host without mam_rs is not listed:\n%s" % r.stdout
    users, messages, size, oldest, newest = parsed[HOST]
    assert (users, messages) == ("3", "20"), out
    assert int(size) > 0
    assert math.floor(max(stamps)) > math.floor(min(stamps))
    assert same_second(oldest, min(stamps)) and same_second(newest, max(stamps)), (out, min(stamps), max(stamps))
    assert parsed[EMPTY] == ("0", "0", "0", "-", "-"), out

    one = ok(ctl(srv, "info", HOST))
    assert lines(one.stdout) == [ln for ln in out if ln.startswith(HOST + ":")], one.stdout


def test_user_stats(populated):
    srv, _, snaps = populated
    host_bytes = int(INFO_RE.match(next(ln for ln in lines(ok(ctl(srv, "info", HOST)).stdout)
                                        if ln.startswith(HOST + ":"))).group(4))
    sizes = {}
    for user, withs in (("alice", ["  with bob@localhost: 8", "  with carol@localhost: 2"]),
                        ("bob", ["  with alice@localhost: 8"]),
                        ("carol", ["  with alice@localhost: 2"])):
        r = ok(ctl(srv, "user_stats", user + "@localhost"))
        out = lines(r.stdout)
        m = STATS_RE.match(out[0])
        assert m and m.group(1) == user + "@localhost", out
        assert int(m.group(2)) == len(snaps[user]["ids"]), out
        stamps = [stamp_to_epoch(s) for s in snaps[user]["stamps"]]
        assert same_second(m.group(4), stamps[0]) and same_second(m.group(5), stamps[-1]), out
        assert out[1:] == withs, "most frequent contact first:\n%s" % r.stdout
        sizes[user] = int(m.group(3))
    assert 0 < sizes["carol"] < sizes["bob"] < sizes["alice"], sizes
    assert sum(sizes.values()) <= host_bytes, (sizes, host_bytes)

    empty = ok(ctl(srv, "user_stats", "dave@localhost"))
    assert lines(empty.stdout) == ["dave@localhost: 0 messages, 0 bytes, oldest -, newest -"], empty.stdout


# --------------------------------------------------------------------------
# export


def check_json_export(doc, snap, user="alice"):
    assert doc["host"] == HOST and doc["user"] == user, {k: v for k, v in doc.items() if k != "messages"}
    msgs = doc["messages"]
    assert [m["id"] for m in msgs] == snap["ids"], "export is not the archive, in archive order"
    for m, stamp, n, frm, to in zip(msgs, snap["stamps"], snap["norms"], snap["froms"], snap["tos"]):
        assert stamp_to_epoch(m["timestamp"]) == pytest.approx(stamp_to_epoch(stamp), abs=1e-6), (m, stamp)
        assert m["timestamp"].endswith("Z")
        out = bare(frm) == "%s@%s" % (user, HOST)
        assert m["direction"] == ("out" if out else "in"), m
        assert m["with"] == bare(to if out else frm), m
        el = ET.fromstring(m["stanza"])
        assert el.tag == "{%s}message" % NS_CLIENT, m["stanza"]
        assert norm(el) == n, "exported stanza differs from what MAM serves:\n%s" % m["stanza"]


def test_export_json_to_stdout_and_to_a_file(populated, tmp_path):
    srv, _, snaps = populated
    r = ok(ctl(srv, "export", "alice@localhost"))
    doc = json.loads(r.stdout)
    check_json_export(doc, snaps["alice"])
    path = tmp_path / "alice.json"
    ok(ctl(srv, "export", "alice@localhost", "--format", "json", "--output", str(path)))
    assert json.loads(path.read_text()) == doc
    empty = json.loads(ok(ctl(srv, "export", "dave@localhost")).stdout)
    assert empty["messages"] == [] and empty["user"] == "dave"


def check_xml_export(root, snap, user="alice"):
    assert root.tag == "{%s}server-data" % NS_PIE, root.tag
    hosts = root.findall("{%s}host" % NS_PIE)
    assert [h.get("jid") for h in hosts] == [HOST]
    users = hosts[0].findall("{%s}user" % NS_PIE)
    assert [u.get("name") for u in users] == [user]
    archives = users[0].findall("{%s}archive" % NS_PIE_MAM)
    assert len(archives) == 1
    results = archives[0].findall("{%s}result" % NS_MAM)
    assert [r.get("id") for r in results] == snap["ids"]
    for r, stamp, n in zip(results, snap["stamps"], snap["norms"]):
        delay = r.find("{%s}forwarded/{%s}delay" % (NS_FORWARD, NS_DELAY))
        assert stamp_to_epoch(delay.get("stamp")) == pytest.approx(stamp_to_epoch(stamp), abs=1e-6)
        msg = r.find("{%s}forwarded/{%s}message" % (NS_FORWARD, NS_CLIENT))
        assert msg is not None and norm(msg) == n, ET.tostring(r)


def test_export_xml_xep0227_style(populated, tmp_path):
    srv, _, snaps = populated
    path = tmp_path / "alice.xml"
    ok(ctl(srv, "export", "alice@localhost", "--format", "xml", "--output", str(path)))
    check_xml_export(ET.parse(path).getroot(), snaps["alice"])
    stdout = ok(ctl(srv, "export", "alice@localhost", "--format", "xml"))
    check_xml_export(ET.fromstring(stdout.stdout), snaps["alice"])


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_export_round_trips_through_import_file_into_a_fresh_server(populated, tmp_path, connect, fmt):
    srv, _, snaps = populated
    path = tmp_path / ("alice." + fmt)
    ok(ctl(srv, "export", "alice@localhost", "--format", fmt, "--output", str(path)))
    fresh = StorageServer(users=("alice", "bob")).start()
    try:
        r = ok(ctl(fresh, "import", "alice@localhost", "--file", str(path)))
        summary = [ln for ln in re.split(r"[\r\n]", r.stdout) if ln.startswith("import summary:")]
        assert len(summary) == 1 and "messages=10 already=0 skipped=0" in summary[0], r.stdout
        alice = connect(fresh, "alice")
        got, want = snapshot(alice), snaps["alice"]
        for k in ("ids", "bodies", "stamps", "norms"):
            assert got[k] == want[k], "%s differ after the %s round trip" % (k, fmt)
        again = ok(ctl(fresh, "import", "alice@localhost", "--file", str(path)))
        assert "messages=0 already=10" in again.stdout, again.stdout
        bob = connect(fresh, "bob")
        new = exchange(alice, bob, "after the round trip " + token())
        after = alice.mam_ok(rsm={"max": 10, "after": want["ids"][-1]})
        assert after.bodies == [new] and after.complete
        assert snapshot(alice)["ids"][:10] == want["ids"]
    finally:
        fresh.stop()


# --------------------------------------------------------------------------
# Wrong arguments: exit 1, a message naming the culprit, nothing changed


NOT_EXPORT_FILES = {
    "text": "hello, this is not an export\n",
    "json": '{"foo": [1, 2, 3]}\n',
    "xml": "<server-data xmlns='urn:example:not-pie'><nothing/></server-data>\n",
}

BAD = [
    # (args, text the message must contain)
    (["user_stats"], "user"),
    (["user_stats", "alice@nosuch.example"], "nosuch.example"),
    (["user_stats", "alice@" + NOMAM], NOMAM),
    (["user_stats", "al ice@localhost"], "al ice@localhost"),
    (["user_stats", "@localhost"], "@localhost"),
    (["user_stats", "localhost"], "localhost"),
    (["user_stats", "alice@localhost/phone"], "alice@localhost/phone"),
    (["user_stats", "alice@localhost", "--frobnicate"], "--frobnicate"),
    (["export"], "user"),
    (["export", "alice@nosuch.example"], "nosuch.example"),
    (["export", "alice@" + NOMAM], NOMAM),
    (["export", "al ice@localhost"], "al ice@localhost"),
    (["export", "alice@localhost", "--format", "csv"], "csv"),
    (["export", "alice@localhost", "--format"], "--format"),
    (["export", "alice@localhost", "--frobnicate"], "--frobnicate"),
    (["export", "alice@localhost", "--output", "/nonexistent-e2e-dir/alice.json"], "/nonexistent-e2e-dir/alice.json"),
    (["delete_user_data"], "user"),
    (["delete_user_data", "alice@nosuch.example"], "nosuch.example"),
    (["delete_user_data", "alice@" + NOMAM], NOMAM),
    (["delete_user_data", "al ice@localhost"], "al ice@localhost"),
    (["delete_user_data", "alice@localhost", "--frobnicate"], "--frobnicate"),
    (["import", "alice@nosuch.example"], "nosuch.example"),
    (["import", "nosuch.example"], "nosuch.example"),
    (["import", NOMAM], NOMAM),
    (["import", "al ice@localhost"], "al ice@localhost"),
    (["import", "--frobnicate"], "--frobnicate"),
    (["import", "--file", "{tmp}/alice.json"], "user"),
    (["import", "alice@localhost", "--file", "/nonexistent-e2e-dir/alice.json"], "/nonexistent-e2e-dir/alice.json"),
    (["import", "alice@localhost", "--file", "{tmp}/not-export.text"], "{tmp}/not-export.text"),
    (["import", "alice@localhost", "--file", "{tmp}/not-export.json"], "{tmp}/not-export.json"),
    (["import", "alice@localhost", "--file", "{tmp}/not-export.xml"], "{tmp}/not-export.xml"),
    (["import", "alice@localhost", "--file"], "--file"),
    (["info", "nosuch.example"], "nosuch.example"),
    (["info", NOMAM], NOMAM),
    (["info", "--frobnicate"], "--frobnicate"),
    (["optimize", "nosuch.example"], "nosuch.example"),
    (["optimize", "--frobnicate"], "--frobnicate"),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-args")
    for ext, text in NOT_EXPORT_FILES.items():
        (d / ("not-export." + ext)).write_text(text)
    (d / "alice.json").write_text(json.dumps({"host": HOST, "user": "alice", "messages": []}))
    return d


@pytest.mark.parametrize("args, needle", BAD, ids=[" ".join(a) or "-" for a, _ in BAD])
def test_bad_arguments_exit_1_naming_the_culprit(populated, bad_files, args, needle):
    srv, clients, snaps = populated
    args = [a.replace("{tmp}", str(bad_files)) for a in args]
    needle = needle.replace("{tmp}", str(bad_files))
    r = ctl(srv, *args)
    out = r.stdout + r.stderr
    assert r.returncode == 1, "want exit 1 for %r, got %d:\n%s" % (args, r.returncode, out)
    assert needle.lower() in out.lower(), "the message for %r should name %r:\n%s" % (args, needle, out)
    assert "stack traceback" not in out, out
    # Nothing changed.
    for u in ("alice", "bob"):
        assert clients[u].mam_ok(rsm={"max": 0}).count == len(snaps[u]["ids"]), "%s's archive changed" % u


def test_unknown_command_prints_usage_with_every_command(populated):
    srv = populated[0]
    r = ctl(srv, "frobnicate")
    assert r.returncode == 1, r
    for command in ("import", "info", "user_stats", "export", "delete_user_data", "optimize", "cleanup"):
        assert command in r.stdout, "usage lacks %r:\n%s" % (command, r.stdout)


# --------------------------------------------------------------------------
# optimize


def test_optimize_beside_the_running_server(populated):
    srv, clients, snaps = populated
    for args in ((), (HOST,)):
        r = ok(ctl(srv, "optimize", *args))
        out = lines(r.stdout)
        assert out and out[-1] == "optimize: ok", r.stdout
        assert any("analy" in ln.lower() for ln in out), "optimize should say what it did:\n%s" % r.stdout
    clients["alice"].ping()
    assert snapshot(clients["alice"]) == snaps["alice"], "optimize changed the archive"


# --------------------------------------------------------------------------
# Deleting a user's data: the admin command and in-band account removal


def stored_prefs(srv, user):
    """The user's stored archive_prefs: rows of prosody.sqlite, or the internal .dat file's text."""
    if srv.storage == "sql":
        return stored_prefs_sql(srv, user)
    f = srv.data / HOST / "archive_prefs" / (user + ".dat")
    return f.read_text() if f.exists() else []


def removed_count(out):
    """The numbers printed before "message(s)", e.g. [5] for "alice@localhost: removed 5 messages"."""
    return [int(n) for n in re.findall(r"(?<![\w.])(\d+) (?:\w+ )?messages?\b", out)]


def fill_user(alice, bob, carol):
    """alice gets 4 messages with bob and 1 from carol, and prefs with both lists."""
    bodies = [exchange(alice, bob, "to bob %d & <ü> %s" % (i, token())) for i in range(2)]
    bodies += [exchange(bob, alice, "to alice %d %s" % (i, token())) for i in range(2)]
    bodies.append(exchange(carol, alice, "from carol " + token()))
    set_prefs(alice, "roster", always=["carol@localhost"], never=["dave@localhost"])
    assert get_prefs(alice) == ("roster", ["carol@localhost"], ["dave@localhost"])
    assert stored_prefs(alice.server, "alice") != []
    return bodies


@pytest.mark.parametrize("storage", ["sql", "internal"])
def test_delete_user_data_removes_archive_and_prefs(connect, storage):
    srv = StorageServer(users=("alice", "bob", "carol", "dave"), storage=storage).start()
    try:
        alice, bob, carol = connect(srv, "alice"), connect(srv, "bob"), connect(srv, "carol")
        fill_user(alice, bob, carol)
        alice.disconnect()
        r = ok(ctl(srv, "delete_user_data", "alice@localhost"))
        assert removed_count(r.stdout) == [5], "should say it removed 5 messages:\n%s" % r.stdout
        assert stored_prefs(srv, "alice") == []
        alice = connect(srv, "alice")
        assert alice.mam_ok(rsm={"max": 0}).count == 0
        assert get_prefs(alice) == ("always", [], [])
        # The contacts' own archives are theirs: untouched.
        assert bob.mam_ok(rsm={"max": 0}).count == 4 and carol.mam_ok(rsm={"max": 0}).count == 1
        # Archiving goes on for alice, under the default prefs.
        fresh = exchange(bob, alice, "after the deletion " + token())
        assert alice.mam_ok().bodies == [fresh]
        again = ok(ctl(srv, "delete_user_data", "alice@localhost"))
        assert removed_count(again.stdout) == [1], again.stdout
        none = ok(ctl(srv, "delete_user_data", "alice@localhost"))
        assert removed_count(none.stdout) == [0], none.stdout
    finally:
        srv.stop()


def test_delete_user_data_while_the_user_is_online(connect):
    """Beside a running server: the archive and the stored prefs go at once. Prefs cached in
    the user's online sessions (as stock caches them) last until those sessions end; the
    in-band deletion (user-deleted, in the server) has no such delay."""
    srv = StorageServer(users=("alice", "bob", "carol", "dave")).start()
    try:
        alice, bob, carol = connect(srv, "alice"), connect(srv, "bob"), connect(srv, "carol")
        fill_user(alice, bob, carol)
        set_prefs(alice, "always", never=["bob@localhost"])
        r = ok(ctl(srv, "delete_user_data", "alice@localhost"))
        assert removed_count(r.stdout) == [5], r.stdout
        assert alice.mam_ok(rsm={"max": 0}).count == 0
        assert stored_prefs_sql(srv, "alice") == []
        alice.disconnect()
        alice = connect(srv, "alice")
        assert get_prefs(alice) == ("always", [], []), "a new session must not see the deleted prefs"
        kept = exchange(bob, alice, "bob is no longer in never " + token())
        assert alice.mam_ok().bodies == [kept]
    finally:
        srv.stop()


def test_in_band_account_removal_removes_archive_and_prefs(connect):
    srv = StorageServer(users=("alice", "bob", "carol", "dave"), extra_modules=["register"],
                        extra_config=["allow_registration = true"]).start()
    try:
        alice, bob, carol = connect(srv, "alice"), connect(srv, "bob"), connect(srv, "carol")
        fill_user(alice, bob, carol)
        stats = ok(ctl(srv, "user_stats", "alice@localhost"))
        assert lines(stats.stdout)[0].startswith("alice@localhost: 5 messages"), stats.stdout
        r = alice.iq("set", "<query xmlns='jabber:iq:register'><remove/></query>")
        assert r.type == "result", r
        alice.disconnect()  # the server closes the stream; no reconnect attempts
        # The account is gone; its archive went with it (the contacts' archives stay).
        stats = []

        def emptied():
            stats.append(ok(ctl(srv, "user_stats", "alice@localhost")).stdout)
            return lines(stats[-1])[0].startswith("alice@localhost: 0 messages")

        assert wait_until(emptied, timeout=10), "alice's archive is still there:\n%s" % stats[-1]
        assert bob.mam_ok(rsm={"max": 0}).count == 4 and carol.mam_ok(rsm={"max": 0}).count == 1
        # A new account under the same name starts empty, with default prefs.
        reg = prosodyctl(srv, "register", "alice", HOST, "pw-alice")
        assert reg.returncode == 0, reg
        alice = connect(srv, "alice")
        assert alice.mam_ok(rsm={"max": 0}).count == 0
        assert get_prefs(alice) == ("always", [], [])
        assert stored_prefs_sql(srv, "alice") == []
    finally:
        srv.stop()
