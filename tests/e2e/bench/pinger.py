"""The other client (bob), in a process of its own so that the querying client's work never
delays its pings: `python -m bench.pinger PORT INTERVAL` (cwd tests/e2e).

Prints "ready" once logged in, then sends an XMPP ping every INTERVAL seconds, open loop (a
slow answer does not delay the next ping), until a line arrives on stdin. Then it waits for
the outstanding answers and prints one JSON line: [[wall time sent, round trip s or null], ...].
"""

import asyncio
import json
import sys
import threading
import time

from bench.server import password
from bench.xmpp import Conn


async def run(port, interval):
    conn = await Conn(port, "bob", password("bob"), "pinger").connect()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def wait_stdin():
        sys.stdin.readline()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_stdin, daemon=True).start()
    print("ready", flush=True)
    sent = []  # (wall, perf, future)
    t0 = time.perf_counter()
    k = 0
    while not stop.is_set():
        target = t0 + k * interval
        delay = target - time.perf_counter()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                break
            except asyncio.TimeoutError:
                pass
        fut = conn.iq_future("get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost", iq_id="p%d" % k)
        sent.append((time.time(), time.perf_counter(), fut))
        k += 1
        if time.perf_counter() - target > 10 * interval:
            # Far behind (this process was starved): skip ahead instead of bursting.
            k = int((time.perf_counter() - t0) / interval) + 1
    samples = []
    for wall, perf, fut in sent:
        try:
            r = await asyncio.wait_for(fut, 300)
            samples.append((wall, r.t - perf))
        except (asyncio.TimeoutError, Exception):
            samples.append((wall, None))
    await conn.close()
    print(json.dumps(samples), flush=True)


def main():
    port, interval = int(sys.argv[1]), float(sys.argv[2])
    asyncio.run(run(port, interval))


if __name__ == "__main__":
    main()
