"""Lua heap allocated per archived message: `make bench-alloc`.

Lua's collector is a large part of what each message costs Prosody's loop (README, Benchmarks),
and what it does grows with what the handlers allocate. Unlike a timing, the bytes a message
leaves on the heap do not depend on the machine's load: with the collector stopped
(tests/e2e/plugins/mod_bench_alloc.lua), the heap's growth over the throughput workload
(10 clients sending to each other, the messages of bench/run.py) divided by the messages is
the same from one run to the next, to a few bytes. Stock mod_mam, mod_mam_rs and Prosody with
no archive module, one after another, each on a fresh server.

    .venv/bin/python tests/e2e/bench_alloc.py [--plugin-dir DIR] [--msgs 300] [--only rs,floor]
"""

import argparse
import asyncio
import re
import shutil
import tempfile
import time
from pathlib import Path

from .run import ARCHIVE_MODULES, chat_messages, log, send_in_bursts
from .server import Server, password
from .xmpp import Conn

KINDS = ("floor", "stock", "rs")
CLIENTS = 10


async def heap_bytes(srv, conn, seen):
    """The heap's size now, as mod_bench_alloc logs it (its `seen`-th line)."""
    conn.send("<message to='localhost'><body>heap</body></message>")
    await conn.ping()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = re.findall(r"heap (\d+) bytes", srv.log.read_text(errors="replace"))
        if len(found) > seen:
            return int(found[seen])
        await asyncio.sleep(0.05)
    raise RuntimeError("no heap size in %s" % srv.log)


async def measure(srv, msgs):
    users = ["u%d" % i for i in range(CLIENTS)]
    conns = [await Conn(srv.port, u, password(u), "alloc").connect() for u in users]
    plans, _ = chat_messages(users, msgs, "alloc")
    total = CLIENTS * msgs
    delivered = asyncio.get_running_loop().create_future()
    state = {"n": 0}

    def on_message(_t):
        state["n"] += 1
        if state["n"] == total:
            delivered.set_result(True)

    for c in conns:
        c.on_message = on_message

    before = await heap_bytes(srv, conns[0], 0)
    await asyncio.gather(*(send_in_bursts(c, plan, 10) for c, plan in zip(conns, plans)))
    await asyncio.wait_for(delivered, 600)
    await asyncio.sleep(0.5)  # the last commits and drains
    after = await heap_bytes(srv, conns[0], 1)
    for c in conns:
        await c.close()
    return (after - before) / total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plugin-dir", default=str(Path(__file__).resolve().parents[3] / "build/plugins/mod_mam_rs"),
                    help="mod_mam_rs's plugin directory (default: build/plugins/mod_mam_rs)")
    ap.add_argument("--msgs", type=int, default=300, help="messages each of the 10 clients sends")
    ap.add_argument("--only", default=",".join(KINDS), help="kinds to measure: floor, stock, rs")
    args = ap.parse_args(argv)
    kinds = [k for k in KINDS if k in args.only.split(",")]
    plugin_dir = Path(args.plugin_dir).resolve()  # the servers run in their own directories
    root = Path(tempfile.mkdtemp(prefix="mam-alloc-", dir="/var/tmp"))
    try:
        accounts = Server(root, "accounts", [], plugin_dir)
        accounts.register(["u%d" % i for i in range(CLIENTS)])
        results = {}
        for kind in kinds:
            srv = Server(root, "alloc-" + kind, ARCHIVE_MODULES[kind] + ["bench_alloc"], plugin_dir,
                         accounts_from=accounts.data).start()
            try:
                results[kind] = asyncio.run(measure(srv, args.msgs))
            finally:
                srv.stop()
            log("%-5s %6.0f bytes of Lua heap per message (%d messages)" % (kind, results[kind], CLIENTS * args.msgs))
        if "floor" in results:
            for kind in [k for k in results if k != "floor"]:
                log("%-5s adds %6.0f bytes per message to the floor's" % (kind, results[kind] - results["floor"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0
