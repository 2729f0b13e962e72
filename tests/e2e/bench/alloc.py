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

import asyncio
import re
import time
from pathlib import Path

from . import per_message
from .run import ARCHIVE_MODULES, log
from .server import Server


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
    conns = await per_message.connect(srv, "alloc")
    before = await heap_bytes(srv, conns[0], 0)
    total = await per_message.workload(conns, msgs, "alloc")
    await asyncio.sleep(0.5)  # the last commits and drains
    after = await heap_bytes(srv, conns[0], 1)
    for c in conns:
        await c.close()
    return (after - before) / total


def main(argv=None):
    args = per_message.arguments(__doc__.split("\n\n")[0], "messages each of the 10 clients sends").parse_args(argv)
    plugin_dir = Path(args.plugin_dir).resolve()  # the servers run in their own directories
    with per_message.accounts("mam-alloc-", plugin_dir) as (root, accounts):
        results = {}
        for kind in per_message.chosen_kinds(args):
            srv = Server(root, "alloc-" + kind, ARCHIVE_MODULES[kind] + ["bench_alloc"], plugin_dir,
                         accounts_from=accounts).start()
            try:
                results[kind] = asyncio.run(measure(srv, args.msgs))
            finally:
                srv.stop()
            log("%-5s %6.0f bytes of Lua heap per message (%d messages)"
                % (kind, results[kind], per_message.CLIENTS * args.msgs))
        if "floor" in results:
            for kind in [k for k in results if k != "floor"]:
                log("%-5s adds %6.0f bytes per message to the floor's" % (kind, results[kind] - results["floor"]))
    return 0
