"""Instructions Prosody executes per archived message, counted by valgrind: `make bench-instr`.

A CPU time on this shared machine moves by a quarter from one run to the next with the other
tenants' load, which hides a change of a few percent in what a message costs. The number of
instructions a thread executes does not depend on that load. Each kind (no archive module,
stock mod_mam, mod_mam_rs) runs on a fresh server under callgrind with counting off; after a
warm-up round of messages, counting goes on (`callgrind_control --instr=on`) for the throughput
workload (10 clients sending to each other in bursts, the messages of bench/run.py), then the
counts are dumped per thread and divided by the messages. Prosody's main thread (its event
loop, Lua and the collector included) is reported apart from the module's own threads (the
writer, the query workers). Under callgrind the loop runs some fifty times slower, so more
stanzas arrive per read and timers (a second's) fire more often per message than at full
speed: the counts compare builds and modules with each other, not with a CPU time. User space
only: the kernel's work (fsync, socket and WAL writes, epoll) is not counted.

    .venv/bin/python tests/e2e/bench_instr.py [--plugin-dir DIR] [--msgs 300] [--only rs,floor]

Where the instructions go: `--lua build/lua-debug/lua --functions 40` (`make bench-profile`)
runs Prosody on a Lua 5.4 built with symbols (Debian's lua5.4 has none, so callgrind sees its
interpreter, collector and string library as addresses) and prints the functions whose own
instructions per message on the main thread differ most between each kind and the floor.
"""

import asyncio
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from . import per_message
from .run import ARCHIVE_MODULES, log
from .server import Server


def callgrind_control(pid, *args):
    r = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError("callgrind_control %s failed: %s %s" % (" ".join(args), r.stdout, r.stderr))


async def measure(srv, pid, msgs, warmup):
    conns = await per_message.connect(srv, "instr")
    await per_message.workload(conns, warmup, "warm")
    await asyncio.sleep(1)  # the warm-up's last commits and drains
    callgrind_control(pid, "--instr=on")
    total = await per_message.workload(conns, msgs, "counted")
    await asyncio.sleep(1)
    callgrind_control(pid, "--dump")
    callgrind_control(pid, "--instr=off")
    for c in conns:
        await c.close()
    return total


def thread_totals(outdir):
    """{thread number: instructions} from callgrind's per-thread dumps of the counted workload
    (`callgrind.out.1-<thread>`, part 1; thread 1 is the main one). The dumps at exit, after
    counting went off, are left out."""
    totals = {}
    for f in outdir.iterdir():
        m = re.fullmatch(r"callgrind\.out\.1-(\d+)", f.name)
        if not m:
            continue
        text = f.read_text(errors="replace")
        found = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if found:
            totals[int(m.group(1))] = totals.get(int(m.group(1)), 0) + int(found.group(1))
    return totals


def own_costs(dump):
    """{function: instructions} from callgrind_annotate's list of each function's own cost."""
    r = subprocess.run(["callgrind_annotate", "--auto=no", "--threshold=100", str(dump)],
                       capture_output=True, text=True, timeout=300)
    costs = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^\s*([\d,]+) \([^)]*\)\s+(\S.*)$", line)
        if m and "PROGRAM TOTALS" not in line:
            name = re.sub(r" \[[^\]]*\]$", "", m.group(2))  # without the object file
            name = re.sub(r"^.*/(?=[^/]+:)", "", name)  # the source file's name, not its path
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def print_differences(root, results, kinds, n):
    """The `n` functions whose own instructions per message on the main thread differ most
    between each kind and the floor."""
    per_message = {}
    for kind in ["floor"] + kinds:
        costs = own_costs(root / ("callgrind-" + kind) / "callgrind.out.1-01")
        per_message[kind] = {f: c / results[kind][2] for f, c in costs.items()}
    floor = per_message["floor"]
    for kind in kinds:
        mine = per_message[kind]
        diffs = sorted(((mine.get(f, 0) - floor.get(f, 0), f) for f in set(mine) | set(floor)),
                       key=lambda d: -abs(d[0]))
        log("%s against the floor, instructions per message on the main thread (own cost, by function):" % kind)
        log("%10s %10s %10s  %s" % ("difference", "floor", kind, "function"))
        for d, f in diffs[:n]:
            log("%+10.0f %10.0f %10.0f  %s" % (d, floor.get(f, 0), mine.get(f, 0), f))


def main(argv=None):
    ap = per_message.arguments(__doc__.split("\n\n")[0], "messages each of the 10 clients sends, counted")
    ap.add_argument("--warmup", type=int, default=60,
                    help="messages each client sends first, not counted (1,200 rows: compression's dictionary is trained)")
    ap.add_argument("--keep", action="store_true", help="keep the servers' work dirs and callgrind's dumps")
    ap.add_argument("--lua", default="lua5.4",
                    help="the Lua 5.4 interpreter Prosody runs on (one built with symbols names its functions)")
    ap.add_argument("--functions", type=int, default=0,
                    help="print the N functions whose own cost per message differs most from the floor's")
    args = ap.parse_args(argv)
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (make bench-instr installs it)")
    if args.functions and "floor" not in per_message.chosen_kinds(args):
        raise SystemExit("--functions compares with the floor: keep it in --only")
    if args.lua != "lua5.4":
        # An interpreter built from Lua's own sources looks for modules under /usr/local: give
        # it the paths of Debian's lua5.4, which Prosody's libraries are installed for.
        for var, what in (("LUA_PATH_5_4", "path"), ("LUA_CPATH_5_4", "cpath")):
            os.environ[var] = subprocess.run(["lua5.4", "-e", "io.write(package.%s)" % what],
                                             capture_output=True, text=True, check=True).stdout
    plugin_dir = Path(args.plugin_dir).resolve()  # the servers run in their own directories
    with per_message.accounts("mam-instr-", plugin_dir, keep=args.keep) as (root, accounts):
        results = {}
        for kind in per_message.chosen_kinds(args):
            outdir = root / ("callgrind-" + kind)
            outdir.mkdir()
            launcher = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                        "--callgrind-out-file=%s/callgrind.out" % outdir, args.lua]
            srv = Server(root, "instr-" + kind, ARCHIVE_MODULES[kind], plugin_dir,
                         accounts_from=accounts, launcher=launcher).start(timeout=300)
            try:
                started = time.monotonic()
                total = asyncio.run(measure(srv, srv.proc.pid, args.msgs, args.warmup))
                took = time.monotonic() - started
            finally:
                srv.stop()
            totals = thread_totals(outdir)
            main_ir = totals.get(1, 0)
            others = sum(v for k, v in totals.items() if k != 1)
            results[kind] = (main_ir / total, others / total, total)
            log("%-5s %9.0f instructions per message on the main thread, %9.0f on the module's threads "
                "(%d messages, %.0f s under callgrind)" % (kind, main_ir / total, others / total, total, took))
        if "floor" in results:
            floor = results["floor"][0]
            kinds = [k for k in results if k != "floor"]
            for kind in kinds:
                m, o, _ = results[kind]
                log("%-5s %.2fx the floor's main thread; %.2fx with its own threads"
                    % (kind, m / floor, (m + o) / floor))
            if args.functions:
                print_differences(root, results, kinds, args.functions)
    return 0
