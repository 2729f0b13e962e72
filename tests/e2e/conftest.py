"""End-to-end harness: real Prosody servers plus real slixmpp clients.

Environment:
  MAM_MODULE            archive module under test: "mam_rs" (default) or "mam" (stock).
  MAM_E2E_EXTRA_CONFIG  extra global config lines appended to every server config.
  MAM_E2E_WORKDIR       where server work dirs go (default /dev/shm/mam-e2e, else tests/e2e/.work).
  MAM_E2E_KEEP=1        keep server work dirs after the run.
  MAM_E2E_BACKEND       where every test server keeps its data: "sqlite" (default: Prosody's
                        sql block is SQLite3, so mod_mam_rs uses its own mam_rs.sqlite),
                        "postgres" or "mariadb" (a fresh database per test server on a real
                        server that the suite starts, or the one MAM_E2E_POSTGRES /
                        MAM_E2E_MYSQL names; Prosody's own stores and the archive both go there).
                        Tests that need the SQLite file carry the sqlite_only marker.

Fixtures:
  server         module-scoped Prosody; a test module may set PROSODY_CONFIG = [lines].
  make_server    factory for function-scoped servers: make_server(extra_config=[...]).
  connect        factory for connected clients: connect(server, "alice", resource=None).
"""

import asyncio
import calendar
import copy
import itertools
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

MAM_MODULE = os.environ.get("MAM_MODULE", "mam_rs")
REPO = Path(__file__).resolve().parents[2]
# tmpfs by default: stock SQLite storage fsyncs every archived message, which is slow on disk.
WORK_ROOT = Path(os.environ.get("MAM_E2E_WORKDIR")
                 or ("/dev/shm/mam-e2e" if os.path.isdir("/dev/shm") else Path(__file__).resolve().parent / ".work"))
USERS = ("alice", "bob", "carol", "dave", "erin", "frank")
HOST = "localhost"
E2E_BACKEND = os.environ.get("MAM_E2E_BACKEND", "sqlite")
assert E2E_BACKEND in ("sqlite", "postgres", "mariadb"), "MAM_E2E_BACKEND=%s: sqlite, postgres or mariadb" % E2E_BACKEND
SQLITE_SQL = 'sql = { driver = "SQLite3", database = "prosody.sqlite" }'

NS_CLIENT = "jabber:client"
NS_MAM = "urn:xmpp:mam:2"
NS_RSM = "http://jabber.org/protocol/rsm"
NS_DATA = "jabber:x:data"
NS_FORWARD = "urn:xmpp:forward:0"
NS_DELAY = "urn:xmpp:delay"
NS_SID = "urn:xmpp:sid:0"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


STAMP_RE = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?Z$")


def password(user):
    return "pw-" + user


def stamp_to_epoch(stamp):
    """XEP-0082 UTC stamp (as sent in <delay stamp>) to epoch seconds, keeping any fraction
    (Prosody 0.12 stamps whole seconds; 13.0 and mod_mam_rs stamp microseconds)."""
    m = STAMP_RE.match(stamp or "")
    assert m, "bad delay stamp %r" % (stamp,)
    whole = calendar.timegm(tuple(int(g) for g in m.groups()[:6]))
    return whole + float(m.group(7) or 0)


def stanza_ids(msg):
    """[(by, id)] of the <stanza-id xmlns=urn:xmpp:sid:0> children of a message element."""
    return [(s.get("by"), s.get("id")) for s in msg.findall("{%s}stanza-id" % NS_SID)]


# --------------------------------------------------------------------------
# pytest plumbing


def pytest_configure(config):
    config.addinivalue_line("markers", "mam_rs_only: passes only against mod_mam_rs (skipped for stock mam)")
    config.addinivalue_line("markers", "sqlite_only: needs the archive in an SQLite file (skipped with "
                                       "MAM_E2E_BACKEND=postgres or mariadb)")


def pytest_collection_modifyitems(config, items):
    for marker, active, reason in (
            ("mam_rs_only", MAM_MODULE != "mam_rs", "mam_rs_only test, MAM_MODULE=%s" % MAM_MODULE),
            ("sqlite_only", E2E_BACKEND != "sqlite", "sqlite_only test, MAM_E2E_BACKEND=%s" % E2E_BACKEND)):
        if active:
            for item in items:
                if marker in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=reason))


_LIVE_SERVERS = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        for srv in list(_LIVE_SERVERS):
            rep.sections.append(("prosody log tail (%s)" % srv.workdir, srv.log_tail(50)))


# --------------------------------------------------------------------------
# Prosody


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_backend_server = None


def backend_server():
    """The session's database server for MAM_E2E_BACKEND (started on first use), or None."""
    global _backend_server
    if E2E_BACKEND != "sqlite" and _backend_server is None:
        from dbservers import open_server  # stopped at exit by dbservers
        _backend_server = open_server(E2E_BACKEND)
    return _backend_server


def backend_sql():
    """(the `sql = { ... }` line for a new test server, its database name): SQLite3 in its
    data dir, or a fresh database on the MAM_E2E_BACKEND server."""
    db = backend_server()
    if db is None:
        return SQLITE_SQL, None
    name = db.create_database()
    return db.prosody_sql(name), name


class ProsodyServer:
    """One Prosody process in its own work dir, c2s on a free loopback port."""

    def __init__(self, extra_config=(), users=USERS, hosts=(HOST,), module=None):
        self.module = module or MAM_MODULE
        self.extra_config = list(extra_config)
        env_extra = os.environ.get("MAM_E2E_EXTRA_CONFIG")
        if env_extra:
            self.extra_config.append(env_extra)
        self.users = users
        self.hosts = hosts
        self.proc = None
        WORK_ROOT.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="prosody-", dir=WORK_ROOT))
        self.data = self.workdir / "data"
        self.cfg = self.workdir / "prosody.cfg.lua"
        self.log = self.workdir / "prosody.log"
        self.pidfile = self.workdir / "prosody.pid"
        self.port = None
        self.sql_line, self.sql_database = backend_sql()

    def _write_config(self):
        lines = [
            "run_as_root = true",
            # Prosody 13's prosodyctl refuses `reload` where systemd runs, for a server it did
            # not start; this one is started by the test, in the foreground.
            "prosodyctl_service_warnings = false",
            'pidfile = "%s"' % self.pidfile,
            'data_path = "%s"' % self.data,
            'log = { debug = "%s" }' % self.log,
            'interfaces = { "127.0.0.1" }',
            "c2s_ports = { %d }" % self.port,
            "c2s_direct_tls_ports = { }",
            "legacy_ssl_ports = { }",
            "s2s_ports = { }",
            "http_ports = { }",
            "https_ports = { }",
            "network_settings = { nagle = false }",
            'modules_enabled = { "roster", "saslauth", "disco", "ping", "carbons", "offline", "%s" }'
            % self.module,
            'modules_disabled = { "s2s" }',
            'plugin_paths = { "%s" }' % (REPO / "build" / "plugins"),
            'authentication = "internal_hashed"',
            "c2s_require_encryption = false",
            "allow_unencrypted_plain_auth = true",
            'storage = "sql"',
            self.sql_line,
            "",
            "-- extra config",
            *self.extra_config,
            "",
        ]
        for h in self.hosts:
            lines.append('VirtualHost "%s"' % h)
        self.cfg.write_text("\n".join(lines) + "\n")

    def start(self, timeout=15.0):
        self.data.mkdir()
        (self.workdir / "certs").mkdir()  # silences certmanager's "cannot open certs" error
        for attempt in range(3):
            self.port = _free_port()
            self._write_config()
            if attempt == 0:
                for h in self.hosts:
                    for u in self.users:
                        subprocess.run(
                            ["prosodyctl", "--config", str(self.cfg), "register", u, h, password(u)],
                            check=True, capture_output=True, timeout=30,
                        )
            out = open(self.workdir / "stdout.txt", "ab")
            self.proc = subprocess.Popen(
                self.command(),
                stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir,
            )
            out.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                        pass
                except OSError:
                    time.sleep(0.05)
                    continue
                # The kernel accepts before the loop runs; once the loop has logged our probe
                # connection, startup (including module loading) is over.
                while time.monotonic() < deadline and "Client connected" not in self.log_text():
                    time.sleep(0.02)
                _LIVE_SERVERS.append(self)
                self._check_module_loaded()
                return self
            self._kill()
            if "Failed to open server port" not in self.log_tail(200):
                break
        raise RuntimeError(
            "prosody did not start (%s)\n--- stdout ---\n%s\n--- log tail ---\n%s"
            % (self.workdir, (self.workdir / "stdout.txt").read_text(errors="replace"), self.log_tail(50))
        )

    def command(self):
        """The argv that runs this server in the foreground. A subclass may wrap it (for example
        in a mount namespace of its own); the process must still end up as Prosody, same pid."""
        return ["prosody", "-F", "--config", str(self.cfg)]

    def _check_module_loaded(self):
        log = self.log_text()
        for marker in ("Unable to load module '%s'" % self.module, "Error initializing module '%s'" % self.module):
            if marker in log:
                tail = self.log_tail(50)
                self.stop()
                raise RuntimeError("archive module %r failed to load (MAM_MODULE=%s):\n%s"
                                   % (self.module, MAM_MODULE, tail))

    def _kill(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to our own child, by PID
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def stop(self):
        if self in _LIVE_SERVERS:
            _LIVE_SERVERS.remove(self)
        self._kill()
        if not os.environ.get("MAM_E2E_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, n=50):
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError as e:
            return "(no log: %s)" % e

    def log_text(self):
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(request):
    srv = ProsodyServer(getattr(request.module, "PROSODY_CONFIG", ())).start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server():
    started = []

    def factory(extra_config=(), **kw):
        srv = ProsodyServer(extra_config, **kw).start()
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop()


# --------------------------------------------------------------------------
# Asyncio loop thread + slixmpp client with a synchronous API


class LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="xmpp-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout=30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args, timeout=30.0):
        async def wrapper():
            return fn(*args)

        return self.run(wrapper(), timeout)

    def stop(self):
        async def drain():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(drain(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


# One ordering counter for every event seen by every client (only touched on the loop thread).
_SEQ = itertools.count(1)


@dataclass
class Received:
    seq: int
    t: float
    xml: ET.Element


@dataclass
class IqReply:
    seq: int
    t: float
    xml: Optional[ET.Element]  # None on timeout
    type: Optional[str] = None
    error_type: Optional[str] = None
    condition: Optional[str] = None
    text: Optional[str] = None

    @classmethod
    def from_xml(cls, seq, t, xml):
        r = cls(seq, t, xml, xml.get("type"))
        err = xml.find("{%s}error" % NS_CLIENT)
        if err is not None:
            r.error_type = err.get("type")
            for child in err:
                tag = child.tag.split("}", 1)[-1]
                if child.tag.startswith("{%s}" % NS_STANZAS):
                    if tag == "text":
                        r.text = child.text or ""
                    else:
                        r.condition = tag
        return r


@dataclass
class MamResult:
    queryid: str
    iq: IqReply
    messages: list = field(default_factory=list)  # list[Received], wire order

    @property
    def fin(self):
        return None if self.iq.xml is None else self.iq.xml.find("{%s}fin" % NS_MAM)

    @property
    def complete(self):
        return self.fin is not None and self.fin.get("complete") == "true"

    def _rsm(self, name):
        s = None if self.fin is None else self.fin.find("{%s}set" % NS_RSM)
        if s is None:
            return None
        e = s.find("{%s}%s" % (NS_RSM, name))
        return None if e is None else (e.text or "")

    @property
    def first(self):
        return self._rsm("first")

    @property
    def last(self):
        return self._rsm("last")

    @property
    def count(self):
        c = self._rsm("count")
        return None if c is None else int(c)

    @property
    def results(self):
        return [m.xml.find("{%s}result" % NS_MAM) for m in self.messages]

    @property
    def ids(self):
        return [r.get("id") for r in self.results]

    @property
    def forwarded(self):
        """The archived (inner) <message> of each result, wire order."""
        return [r.find("{%s}forwarded/{%s}message" % (NS_FORWARD, NS_CLIENT)) for r in self.results]

    @property
    def bodies(self):
        return [m.findtext("{%s}body" % NS_CLIENT) for m in self.forwarded]

    @property
    def stamps(self):
        return [r.find("{%s}forwarded/{%s}delay" % (NS_FORWARD, NS_DELAY)).get("stamp") for r in self.results]


def xml_escape(s):
    return (str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&apos;"))


def mam_query_xml(queryid=None, fields=None, form_type="urn:xmpp:mam:2", rsm=None, flip_page=False,
                  raw_form=None):
    """Build <query xmlns=urn:xmpp:mam:2>.

    fields: {var: value or list of values}; a form is sent if fields, form_type or raw_form is given.
    form_type: FORM_TYPE value; None omits the field (the form is still sent if there are fields).
    rsm: {"max": n, "after": id, "before": id or "" (empty <before/>), "index": n}.
    """
    parts = []
    if raw_form is not None:
        parts.append(raw_form)
    elif fields or form_type:
        f = ["<x xmlns='jabber:x:data' type='submit'>"]
        if form_type is not None:
            f.append("<field var='FORM_TYPE' type='hidden'><value>%s</value></field>" % xml_escape(form_type))
        for var, val in (fields or {}).items():
            vals = val if isinstance(val, (list, tuple)) else [val]
            f.append("<field var='%s'>%s</field>" % (
                xml_escape(var), "".join("<value>%s</value>" % xml_escape(v) for v in vals)))
        f.append("</x>")
        parts.append("".join(f))
    if rsm:
        r = ["<set xmlns='http://jabber.org/protocol/rsm'>"]
        for k in ("max", "index", "after", "before"):
            if k in rsm and rsm[k] is not None:
                v = rsm[k]
                r.append("<%s/>" % k if v == "" else "<%s>%s</%s>" % (k, xml_escape(v), k))
        r.append("</set>")
        parts.append("".join(r))
    if flip_page:
        parts.append("<flip-page/>")
    qid = " queryid='%s'" % xml_escape(queryid) if queryid is not None else ""
    return "<query xmlns='urn:xmpp:mam:2'%s>%s</query>" % (qid, "".join(parts))


class _Xmpp(slixmpp.ClientXMPP):
    def __init__(self, jid, pw):
        super().__init__(
            jid, pw, sasl_mech="PLAIN",
            plugin_config={"feature_mechanisms": {"unencrypted_plain": True}},
        )
        self.enable_direct_tls = False
        self.enable_starttls = False
        self.enable_plaintext = True
        self.received = []  # list[Received]: every <message>
        self.pending = {}  # iq id -> Future
        self.started = asyncio.get_running_loop().create_future()
        self.register_handler(Callback("e2e msg", MatchXPath("{%s}message" % NS_CLIENT), self._on_message))
        self.register_handler(Callback("e2e iq", MatchXPath("{%s}iq" % NS_CLIENT), self._on_iq))
        self.add_event_handler("session_start", self._on_start)
        self.add_event_handler("failed_auth", self._on_fail)
        self.add_event_handler("connection_failed", self._on_fail)

    def _on_message(self, stanza):
        self.received.append(Received(next(_SEQ), time.monotonic(), copy.deepcopy(stanza.xml)))

    def _on_iq(self, stanza):
        if stanza["type"] in ("result", "error"):
            fut = self.pending.pop(stanza["id"], None)
            if fut is not None and not fut.done():
                fut.set_result(IqReply.from_xml(next(_SEQ), time.monotonic(), copy.deepcopy(stanza.xml)))

    def _on_start(self, _event):
        self.send_raw("<presence/>")  # become available so bare-JID messages are delivered here
        if not self.started.done():
            self.started.set_result(True)

    def _on_fail(self, event):
        if not self.started.done():
            self.started.set_exception(RuntimeError("XMPP connect/auth failed: %r" % (event,)))


class Client:
    """Synchronous facade over one slixmpp connection (driven on the shared loop thread)."""

    def __init__(self, lt, server, user, resource=None, host=HOST):
        self.lt = lt
        self.server = server
        self.user = user
        self.bare = "%s@%s" % (user, host)
        self.resource = resource or "e2e-" + uuid.uuid4().hex[:6]
        self.x = None

    # -- connection
    def connect(self, timeout=15.0):
        async def go():
            self.x = _Xmpp("%s/%s" % (self.bare, self.resource), password(self.user))
            self.x.connect("127.0.0.1", self.server.port)
            await asyncio.wait_for(self.x.started, timeout)

        self.lt.run(go(), timeout + 5)
        # Round-trip so the initial presence has been processed before the test starts.
        self.ping()
        return self

    @property
    def jid(self):
        return str(self.x.boundjid.full)

    def disconnect(self):
        if self.x is None:
            return

        x = self.x

        async def go():
            try:
                await asyncio.wait_for(x.disconnect(wait=1.0), 3)
            except Exception:
                x.abort()
            task = x._run_out_filters
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        try:
            self.lt.run(go(), 10)
        except Exception:
            pass
        self.x = None

    # -- raw I/O
    def send_raw(self, data):
        self.lt.call(self.x.send_raw, data)

    def send_message(self, to, body=None, payload="", mtype="chat", msg_id=None):
        """Send a <message>; payload is raw XML appended after the body. Returns the id."""
        msg_id = msg_id or uuid.uuid4().hex
        b = "<body>%s</body>" % xml_escape(body) if body is not None else ""
        t = " type='%s'" % mtype if mtype else ""
        self.send_raw("<message to='%s' id='%s'%s>%s%s</message>" % (to, msg_id, t, b, payload))
        return msg_id

    def iq_async(self, itype, payload="", to=None, iq_id=None):
        """Send an iq; returns a concurrent future resolving to IqReply."""
        iq_id = iq_id or "e2e-" + uuid.uuid4().hex

        async def go():
            fut = asyncio.get_running_loop().create_future()
            self.x.pending[iq_id] = fut
            to_attr = " to='%s'" % to if to else ""
            self.x.send_raw("<iq type='%s' id='%s'%s>%s</iq>" % (itype, iq_id, to_attr, payload))
            return await fut

        return asyncio.run_coroutine_threadsafe(go(), self.lt.loop)

    def iq(self, itype, payload="", to=None, timeout=20.0):
        """Send an iq and wait for the reply; returns IqReply (xml=None on timeout)."""
        fut = self.iq_async(itype, payload, to)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            return IqReply(next(_SEQ), time.monotonic(), None)

    def ping(self, to=HOST, timeout=20.0):
        """XMPP ping; returns (IqReply, rtt seconds)."""
        t0 = time.monotonic()
        r = self.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to=to, timeout=timeout)
        assert r.type == "result", "ping failed: %r" % (r,)
        return r, time.monotonic() - t0

    def disco_features(self, to=None):
        r = self.iq("get", "<query xmlns='http://jabber.org/protocol/disco#info'/>", to=to or self.bare)
        assert r.type == "result", r
        q = r.xml.find("{http://jabber.org/protocol/disco#info}query")
        return [f.get("var") for f in q.findall("{http://jabber.org/protocol/disco#info}feature")]

    # -- messages
    def messages(self, since=0):
        return [m for m in self.lt.call(list, self.x.received) if m.seq > since]

    def chat_messages(self, since=0):
        """Received messages that are not MAM results."""
        return [m for m in self.messages(since) if m.xml.find("{%s}result" % NS_MAM) is None]

    def wait_messages(self, pred, n=1, timeout=15.0, since=0):
        deadline = time.monotonic() + timeout
        while True:
            got = [m for m in self.messages(since) if pred(m.xml)]
            if len(got) >= n or time.monotonic() > deadline:
                return got
            time.sleep(0.02)

    def wait_body(self, body, timeout=15.0):
        got = self.wait_messages(lambda x: x.findtext("{%s}body" % NS_CLIENT) == body, 1, timeout)
        assert got, "%s never received body %r" % (self.bare, body)
        return got[0].xml

    def wait_id(self, msg_id, timeout=15.0):
        got = self.wait_messages(lambda x: x.get("id") == msg_id, 1, timeout)
        assert got, "%s never received message id %r" % (self.bare, msg_id)
        return got[0].xml

    def last_seq(self):
        return self.lt.call(lambda: next(_SEQ))

    # -- MAM
    def mam_async(self, to=None, queryid=None, **kw):
        qid = queryid or "q-" + uuid.uuid4().hex[:10]
        fut = self.iq_async("set", mam_query_xml(qid, **kw), to=to)
        return qid, fut

    def mam_collect(self, qid, reply):
        if reply.xml is None:
            msgs = []
        else:
            msgs = [m for m in self.messages() if m.seq < reply.seq and _result_qid(m.xml) == qid]
        return MamResult(qid, reply, msgs)

    def mam(self, to=None, queryid=None, timeout=30.0, **kw):
        """Run one MAM query (see mam_query_xml for kw); returns MamResult."""
        qid, fut = self.mam_async(to=to, queryid=queryid, **kw)
        try:
            reply = fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            reply = IqReply(next(_SEQ), time.monotonic(), None)
        return self.mam_collect(qid, reply)

    def mam_ok(self, **kw):
        r = self.mam(**kw)
        assert r.iq.type == "result", "MAM query failed: %r" % (r.iq,)
        assert r.fin is not None, "no <fin/> in %r" % (ET.tostring(r.iq.xml),)
        return r

    def mam_all(self, **kw):
        """Page forward through the whole result set (max 50 per page); returns list of result elements."""
        out, after = [], None
        for _ in range(1000):
            rsm = {"max": 50}
            if after:
                rsm["after"] = after
            r = self.mam_ok(rsm=rsm, **kw)
            out.extend(r.messages)
            if r.complete or not r.messages:
                return MamResult(r.queryid, r.iq, out)
            after = r.last
        raise AssertionError("paging did not terminate")


def _result_qid(xml):
    r = xml.find("{%s}result" % NS_MAM)
    return None if r is None else r.get("queryid")


@pytest.fixture(scope="session")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.stop()


def _client_factory(loop_thread):
    """Yields a connect(server, user, resource=None) function; disconnects its clients after."""
    clients = []

    def factory(server, user, resource=None):
        c = Client(loop_thread, server, user, resource).connect()
        clients.append(c)
        return c

    yield factory
    for c in clients:
        c.disconnect()


@pytest.fixture
def connect(loop_thread):
    yield from _client_factory(loop_thread)


@pytest.fixture(scope="module")
def connect_module(loop_thread):
    """Like connect, but the clients live for the whole test module."""
    yield from _client_factory(loop_thread)


# --------------------------------------------------------------------------
# Lifecycle helpers (restart on the same data dir, signals); used by test_lifecycle.py and
# bench_vs_stock.py. They only add to the harness above.


def stop_server_keep_data(srv, sig=None, timeout=30.0):
    """Stop srv's Prosody with `sig` (default SIGTERM) and wait for it; the work dir stays."""
    import signal as _signal
    if srv.proc is None:
        return None
    srv.proc.send_signal(_signal.SIGTERM if sig is None else sig)  # our own child, by PID
    try:
        rc = srv.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        rc = srv.proc.wait(timeout=10)
        raise RuntimeError("prosody did not exit within %.0fs of signal %r" % (timeout, sig))
    finally:
        srv.proc = None
    return rc


def restart_server(srv, timeout=15.0, check_module=True):
    """Start a stopped ProsodyServer again on the same work dir, data dir and config file.

    Unlike ProsodyServer.start() this neither creates the data dir nor registers users. It
    keeps the port when it is still free, else picks a new one. With check_module=False, a
    module that fails to load is left to the test to examine. Returns srv."""
    assert srv.proc is None, "restart_server: the server is still running"
    for attempt in range(3):
        if attempt:
            srv.port = _free_port()
        srv._write_config()
        offset = srv.log.stat().st_size if srv.log.exists() else 0
        out = open(srv.workdir / "stdout.txt", "ab")
        srv.proc = subprocess.Popen(
            srv.command(),
            stdout=out, stderr=subprocess.STDOUT, cwd=srv.workdir,
        )
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and srv.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", srv.port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            while time.monotonic() < deadline and b"Client connected" not in srv.log.read_bytes()[offset:]:
                time.sleep(0.02)
            if srv not in _LIVE_SERVERS:
                _LIVE_SERVERS.append(srv)
            if check_module:
                srv._check_module_loaded()
            return srv
        srv._kill()
        if b"Failed to open server port" not in srv.log.read_bytes()[offset:]:
            break
    raise RuntimeError("prosody did not restart (%s)\n--- log tail ---\n%s" % (srv.workdir, srv.log_tail(50)))


# --------------------------------------------------------------------------
# Extra modules and test-only plugins (tests/e2e/plugins); used by test_events.py and
# test_interplay.py. Only adds to the harness above.

E2E_PLUGIN_DIR = Path(__file__).resolve().parent / "plugins"


class ModulesServer(ProsodyServer):
    """A ProsodyServer with `extra_modules` appended to modules_enabled and tests/e2e/plugins
    added to plugin_paths (for test-only plugins such as mod_mam_e2e_probe)."""

    def __init__(self, extra_config=(), extra_modules=(), **kw):
        super().__init__(extra_config, **kw)
        self.extra_modules = list(extra_modules)

    def _write_config(self):
        super()._write_config()
        text = self.cfg.read_text()
        mods_old = '"%s" }' % self.module
        paths_old = 'plugin_paths = { "%s" }' % (REPO / "build" / "plugins")
        assert mods_old in text and paths_old in text, "unexpected config layout in %s" % self.cfg
        text = text.replace(mods_old, '"%s"%s }' % (self.module, "".join(', "%s"' % m for m in self.extra_modules)), 1)
        text = text.replace(paths_old, 'plugin_paths = { "%s", "%s" }' % (REPO / "build" / "plugins", E2E_PLUGIN_DIR), 1)
        self.cfg.write_text(text)


# --------------------------------------------------------------------------
# Small helpers shared by the test modules.

def wait_until(pred, timeout=15.0, step=0.2):
    """Polls `pred` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def token():
    """A short unique string for message bodies."""
    return uuid.uuid4().hex[:12]


def exchange(sender, recipient, text):
    """sender -> recipient's bare JID; waits for delivery (archiving happens before it)."""
    mid = sender.send_message(recipient.bare, text)
    recipient.wait_id(mid)
    return text


def prosodyctl(srv, *args, timeout=60):
    """Runs prosodyctl against a test server's config; returns the CompletedProcess."""
    return subprocess.run(["prosodyctl", "--config", str(srv.cfg), *args],
                          capture_output=True, text=True, timeout=timeout)


def _sql_literal(v):
    return "'%s'" % str(v).replace("'", "''")


def backend_rows(srv, statement, sqlite_file="prosody.sqlite"):
    """Rows of `statement` (one SELECT; quote identifiers with double quotes) in the database
    where `srv` keeps its data: `sqlite_file` in its data dir (read-only), or its database on
    the MAM_E2E_BACKEND server. Values come back as text, whatever the backend."""
    db = backend_server()
    if db is None:
        import sqlite3
        con = sqlite3.connect("file:%s?mode=ro" % (srv.data / sqlite_file), uri=True, timeout=10)
        try:
            return [tuple(None if v is None else str(v) for v in row) for row in con.execute(statement)]
        finally:
            con.close()
    return db.sql(statement, database=srv.sql_database)


def stored_prefs_sql(srv, user):
    """A user's rows of the archive_prefs store in mod_storage_sql's table, sorted."""
    return sorted(backend_rows(
        srv, 'SELECT "key", "type", "value" FROM "prosody" WHERE "host" = \'localhost\' '
             'AND "store" = \'archive_prefs\' AND "user" = %s' % _sql_literal(user)))


# --------------------------------------------------------------------------
# Storage choice, extra config after the VirtualHost lines, and servers on a copy of another
# server's data directory; used by test_import.py and test_admin_commands.py. Only adds to the
# harness above.


class StorageServer(ProsodyServer):
    """A ProsodyServer with `storage` = "sql" (the base config) or "internal", more entries in
    modules_enabled and plugin_paths, and raw `trailing` lines written after the VirtualHost
    lines (for example another VirtualHost with its own modules_disabled). `sql`, when given,
    is the line that replaces the base config's SQLite `sql = { ... }` line (for example
    postgres_server.prosody_sql()), so that Prosody sees one sql option."""

    def __init__(self, extra_config=(), storage="sql", extra_modules=(), plugin_paths=(), trailing=(), sql=None, **kw):
        self._init_args = dict(extra_config=list(extra_config), storage=storage, extra_modules=list(extra_modules),
                               plugin_paths=list(plugin_paths), trailing=list(trailing), sql=sql, **kw)
        super().__init__(extra_config, **kw)
        self.storage = storage
        self.sql = sql
        self.extra_modules = list(extra_modules)
        self.plugin_paths = [str(p) for p in plugin_paths]
        self.trailing = list(trailing)

    def _write_config(self):
        super()._write_config()
        text = self.cfg.read_text()

        def sub(old, new):
            assert old in text, "unexpected config layout in %s: no %r" % (self.cfg, old)
            return text.replace(old, new, 1)

        if self.storage != "sql":
            text = sub('storage = "sql"\n', 'storage = "%s"\n' % self.storage)
        if self.sql:
            text = sub(self.sql_line + "\n", self.sql.rstrip("\n") + "\n")
        if self.extra_modules:
            text = sub('"%s" }' % self.module,
                       '"%s"%s }' % (self.module, "".join(', "%s"' % m for m in self.extra_modules)))
        if self.plugin_paths:
            old = 'plugin_paths = { "%s" }' % (REPO / "build" / "plugins")
            text = sub(old, 'plugin_paths = { "%s"%s }' % (REPO / "build" / "plugins",
                                                          "".join(', "%s"' % p for p in self.plugin_paths)))
        if self.trailing:
            text += "\n" + "\n".join(self.trailing) + "\n"
        self.cfg.write_text(text)

    def clone(self, start=True, **overrides):
        """A new StorageServer with this one's settings (overridden by `overrides`, e.g.
        module="mam_rs") on a copy of this server's data directory: its accounts, archives and
        prefs. This server must be stopped. The copy is started unless start=False; then its
        config is written, and restart_server(copy) starts it later."""
        assert self.proc is None, "clone: stop the source server first (stop_server_keep_data)"
        args = dict(self._init_args)
        args.setdefault("module", self.module)
        args.update(overrides)
        new = StorageServer(**args)
        new.sql_line, new.sql_database = self.sql_line, self.sql_database  # the same database
        shutil.copytree(self.data, new.data)
        (new.workdir / "certs").mkdir(exist_ok=True)
        new.port = _free_port()
        new._write_config()
        if start:
            restart_server(new)
        return new


# --------------------------------------------------------------------------
# Real database servers (tests/e2e/dbservers.py): one PostgreSQL and one MariaDB per session,
# started only when a test asks for one, stopped and removed at the end. MAM_E2E_POSTGRES /
# MAM_E2E_MYSQL (URLs) use existing servers instead. A test that stops a server must start it
# again (try/finally): the session's later tests share it. Only adds to the harness above.


@pytest.fixture(scope="session")
def postgres_server():
    """A running PostgreSQL (dbservers.PostgresServer): .prosody_sql(), .sql(), .stop(), .start()."""
    from dbservers import open_server
    srv = open_server("postgres")
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def mariadb_server():
    """A running MariaDB (dbservers.MariaDBServer), Prosody's driver "MySQL"; API as postgres_server."""
    from dbservers import open_server
    srv = open_server("mariadb")
    yield srv
    srv.close()
