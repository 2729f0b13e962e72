"""What bench/alloc.py and bench/instr.py share: both measure what one archived message costs a
fresh server (Lua heap, instructions) over the throughput workload of bench/run.py, for no
archive module, stock mod_mam and mod_mam_rs, one server after another."""

import argparse
import asyncio
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .run import chat_messages, send_in_bursts
from .server import Server, password
from .xmpp import Conn

KINDS = ("floor", "stock", "rs")
CLIENTS = 10
USERS = ["u%d" % i for i in range(CLIENTS)]
BURST = 10


def arguments(description, msgs_help):
    """The options both take: --plugin-dir, --msgs (each client's), --only."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--plugin-dir", default=str(Path(__file__).resolve().parents[3] / "build/plugins/mod_mam_rs"),
                    help="mod_mam_rs's plugin directory (default: build/plugins/mod_mam_rs)")
    ap.add_argument("--msgs", type=int, default=300, help=msgs_help)
    ap.add_argument("--only", default=",".join(KINDS), help="kinds to measure: floor, stock, rs")
    return ap


def chosen_kinds(args):
    return [k for k in KINDS if k in args.only.split(",")]


@contextmanager
def accounts(prefix, plugin_dir, keep=False):
    """A temp dir under /var/tmp and a data dir with the clients' accounts registered, for the
    servers to start from (`accounts_from`)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        registered = Server(root, "accounts", [], plugin_dir)
        registered.register(USERS)
        yield root, registered.data
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


async def connect(srv, resource):
    return [await Conn(srv.port, u, password(u), resource).connect() for u in USERS]


async def workload(conns, msgs, tag):
    """Every client sends `msgs` messages to the others, in bursts; returns how many once every
    one has arrived."""
    plans, _ = chat_messages(USERS, msgs, tag)
    total = len(USERS) * msgs
    done = asyncio.get_running_loop().create_future()
    state = {"n": 0}

    def on_message(_t):
        state["n"] += 1
        if state["n"] == total and not done.done():
            done.set_result(True)

    for c in conns:
        c.on_message = on_message
    await asyncio.gather(*(send_in_bursts(c, plan, BURST) for c, plan in zip(conns, plans)))
    await asyncio.wait_for(done, 1800)
    return total
