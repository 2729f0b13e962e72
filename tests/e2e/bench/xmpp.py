"""A small, fast XMPP client for the benchmark: asyncio streams and expat, no slixmpp.

It logs in with SASL PLAIN on a plain loopback connection, binds a resource and sends initial
presence. After that it does not build stanza trees: expat start/end callbacks track the depth
and pick out only what the benchmark needs (iq replies by id, MAM `<result>`s per queryid, the
`<fin/>`'s RSM values, `<stanza-id>`s on received messages). TCP_NODELAY is on (asyncio's
default) and TCP_QUICKACK is set again after every read, so neither end waits on a delayed
ACK. Reply times are taken when the chunk that completes the reply is read, before it is parsed.
"""

import asyncio
import base64
import socket
import time
import xml.parsers.expat

NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_MAM = "urn:xmpp:mam:2"
NS_RSM = "http://jabber.org/protocol/rsm"

STREAM_OPEN = ("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
               "xmlns:stream='http://etherx.jabber.org/streams' to='%s' version='1.0'>")


def xml_escape(s):
    return (str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&apos;"))


def mam_query(queryid, with_=None, start=None, end=None, max_=None, after=None, before=None):
    """<query xmlns='urn:xmpp:mam:2'> with a form and an RSM set. before="" is an empty <before/>."""
    parts = []
    fields = [(k, v) for k, v in (("with", with_), ("start", start), ("end", end)) if v is not None]
    if fields:
        parts.append("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
                     "<value>urn:xmpp:mam:2</value></field>")
        parts.extend("<field var='%s'><value>%s</value></field>" % (k, xml_escape(v)) for k, v in fields)
        parts.append("</x>")
    rsm = []
    if max_ is not None:
        rsm.append("<max>%d</max>" % max_)
    if after is not None:
        rsm.append("<after>%s</after>" % xml_escape(after))
    if before is not None:
        rsm.append("<before/>" if before == "" else "<before>%s</before>" % xml_escape(before))
    if rsm:
        parts.append("<set xmlns='http://jabber.org/protocol/rsm'>%s</set>" % "".join(rsm))
    return "<query xmlns='urn:xmpp:mam:2' queryid='%s'>%s</query>" % (queryid, "".join(parts))


class Reply:
    """An iq reply: type, when it arrived, and for a MAM query the <fin/>'s values."""
    __slots__ = ("type", "t", "complete", "first", "last", "count", "condition", "results")

    def __init__(self, typ, t):
        self.type = typ
        self.t = t
        self.complete = None
        self.first = self.last = self.count = self.condition = None
        self.results = 0


class XmppError(Exception):
    pass


class Conn:
    def __init__(self, port, user, password, resource, domain="localhost", host="127.0.0.1"):
        self.port, self.user, self.password, self.resource = port, user, password, resource
        self.domain, self.host = domain, host
        self.reader = self.writer = None
        self.sock = None
        self.pending = {}  # iq id -> Future[Reply]
        self.result_counts = {}  # queryid -> results received
        self.messages = 0  # <message>s received that are not MAM results
        self.stanza_ids = 0  # of those, how many carry a <stanza-id>
        self.on_message = None  # optional callback(now) per received non-result message
        self._next = 0
        self._read_task = None
        self._closed = False
        self.bytes_in = 0
        self.capture = None
        self.read_time = 0.0
        self.jid = None

    # ---- parsing

    def _new_parser(self):
        p = xml.parsers.expat.ParserCreate()
        p.buffer_text = True
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        self.parser = p
        self.depth = 0
        self.cur = None  # state of the depth-2 stanza being read
        self.text = None
        self.tree = None  # handshake: elements of the current top stanza, when capturing

    def _collect_text(self, data):
        self.text.append(data)

    def _start(self, name, attrs):
        self.depth += 1
        d = self.depth
        if d == 2:
            if name == "iq":
                self.cur = ["iq", attrs.get("id"), attrs.get("type"), None]
            elif name == "message":
                self.cur = ["message", None, None, None]
            else:
                self.cur = [name, None, None, None]
                if self.capture is not None:
                    self.tree = [(name, attrs)]
            return
        cur = self.cur
        if cur is None:
            return
        kind = cur[0]
        if self.capture is not None and self.tree is not None:
            self.tree.append((name, attrs))
        if kind == "message":
            if d == 3:
                if name == "result":
                    q = attrs.get("queryid")
                    cur[1] = "result"
                    self.result_counts[q] = self.result_counts.get(q, 0) + 1
                elif name == "stanza-id":
                    cur[2] = True
        elif kind == "iq":
            if d == 3:
                if name == "fin":
                    r = Reply(cur[2], None)
                    r.complete = attrs.get("complete") in ("true", "1")
                    cur[3] = r
                elif cur[2] == "result" and name == "bind":
                    cur[3] = Reply("result", None)
            elif d == 4 and cur[2] == "error" and name not in ("text",):
                if cur[3] is None:
                    cur[3] = Reply("error", None)
                cur[3].condition = name
            elif d in (4, 5) and cur[3] is not None and name in ("first", "last", "count", "jid"):
                self.text = []
                self.parser.CharacterDataHandler = self._collect_text

    def _end(self, name):
        d = self.depth
        self.depth -= 1
        cur = self.cur
        if d == 2:
            self.cur = None
            if cur is None:
                return
            kind = cur[0]
            if kind == "iq":
                fut = self.pending.pop(cur[1], None)
                if fut is not None and not fut.done():
                    r = cur[3] or Reply(cur[2], None)
                    r.type = cur[2]
                    r.t = self.read_time
                    fut.set_result(r)
            elif kind == "message":
                if cur[1] is None:
                    self.messages += 1
                    if cur[2]:
                        self.stanza_ids += 1
                    if self.on_message is not None:
                        self.on_message(self.read_time)
            elif self.capture is not None:
                self.capture.put_nowait(self.tree)
                self.tree = None
            return
        if self.text is not None and cur is not None and cur[3] is not None and name in ("first", "last", "count", "jid"):
            v = "".join(self.text)
            self.text = None
            self.parser.CharacterDataHandler = None
            if name == "count":
                cur[3].count = int(v)
            elif name == "jid":
                cur[3].first = v
            else:
                setattr(cur[3], name, v)

    async def _read_loop(self):
        sock = self.sock
        quickack = getattr(socket, "TCP_QUICKACK", None)
        try:
            while True:
                data = await self.reader.read(262144)
                if not data:
                    break
                self.read_time = time.perf_counter()
                if quickack is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
                self.bytes_in += len(data)
                self.parser.Parse(data, False)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except xml.parsers.expat.ExpatError as e:
            if not self._closed:
                raise XmppError("bad XML from server: %s" % e)
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(XmppError("connection closed"))
            self.pending.clear()

    # ---- connection

    async def connect(self, timeout=30.0):
        await asyncio.wait_for(self._connect(), timeout)
        return self

    async def _next_top(self):
        return await asyncio.wait_for(self.capture.get(), 30)

    async def _connect(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        self.sock = self.writer.get_extra_info("socket")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.capture = asyncio.Queue()
        self._new_parser()
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop())
        self.send(STREAM_OPEN % self.domain)
        feats = await self._next_top()
        if not any(n == "mechanism" for n, _ in feats):
            raise XmppError("no SASL mechanisms offered: %r" % feats)
        token = base64.b64encode(("\0%s\0%s" % (self.user, self.password)).encode()).decode()
        self.send("<auth xmlns='%s' mechanism='PLAIN'>%s</auth>" % (NS_SASL, token))
        res = await self._next_top()
        if res[0][0] != "success":
            raise XmppError("SASL failed for %s: %r" % (self.user, res))
        # Stream restart: a fresh parser for the new stream.
        self._new_parser()
        self.send(STREAM_OPEN % self.domain)
        feats = await self._next_top()
        if not any(n == "bind" for n, _ in feats):
            raise XmppError("no bind offered: %r" % feats)
        r = await self.iq("set", "<bind xmlns='%s'><resource>%s</resource></bind>" % (NS_BIND, self.resource))
        if r.type != "result":
            raise XmppError("bind failed: %r" % r.type)
        self.jid = r.first
        self.capture = None
        self.send("<presence/>")
        await self.ping()

    def send(self, data):
        self.writer.write(data.encode() if isinstance(data, str) else data)

    def new_id(self, prefix="i"):
        self._next += 1
        return "%s%d" % (prefix, self._next)

    def iq_future(self, typ, payload, to=None, iq_id=None):
        iq_id = iq_id or self.new_id()
        fut = asyncio.get_running_loop().create_future()
        self.pending[iq_id] = fut
        to_attr = " to='%s'" % to if to else ""
        self.send("<iq type='%s' id='%s'%s>%s</iq>" % (typ, iq_id, to_attr, payload))
        return fut

    async def iq(self, typ, payload, to=None, timeout=600):
        return await asyncio.wait_for(self.iq_future(typ, payload, to), timeout)

    async def ping(self, timeout=600):
        """One XMPP ping to the server; returns the round trip in seconds."""
        t0 = time.perf_counter()
        r = await self.iq("get", "<ping xmlns='urn:xmpp:ping'/>", to=self.domain, timeout=timeout)
        if r.type != "result":
            raise XmppError("ping failed")
        return r.t - t0

    async def mam(self, timeout=600, **kw):
        """One MAM query (see mam_query for kw). Returns (seconds, Reply) with Reply.results set to
        the number of <result>s received for it."""
        qid = self.new_id("q")
        t0 = time.perf_counter()
        r = await self.iq("set", mam_query(qid, **kw), timeout=timeout)
        r.results = self.result_counts.pop(qid, 0)
        return r.t - t0, r

    async def close(self):
        self._closed = True
        try:
            self.send("</stream:stream>")
            await asyncio.wait_for(self.writer.drain(), 5)
        except Exception:
            pass
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except Exception:
            pass
        if self._read_task:
            self._read_task.cancel()
            try:
                await self._read_task
            except BaseException:
                pass
