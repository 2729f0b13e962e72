"""Throwaway Prosody servers for the benchmark: loopback, a free port, their own temp dir.

Independent of tests/e2e/conftest.py on purpose: the benchmark picks its own plugin directory
(--plugin-dir), logs at info level (debug logging costs Prosody real CPU per stanza), and
shares one set of registered accounts between servers (copied, not registered again).
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
E2E = HERE.parent
BENCH_PLUGINS = E2E / "plugins"  # mod_mam_memory_ref, mod_bench_run_task
HOST = "localhost"
BASE_MODULES = ("roster", "saslauth", "disco", "ping", "carbons", "offline")


def password(user):
    return "pw-" + user


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thread_cpu_seconds(pid):
    """CPU time per thread name of a process, {"lua5.4": Prosody's main loop, ...}, in seconds:
    each thread's sum_exec_runtime from /proc/<pid>/task/<tid>/schedstat (nanoseconds; the same
    time as utime + stime in /proc/<pid>/stat, without its 10 ms ticks)."""
    out = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                name = f.read().strip()
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out


def proc_cpu_seconds(pid):
    """CPU time of a process, all its threads, seconds (see thread_cpu_seconds)."""
    return sum(thread_cpu_seconds(pid).values())


def file_bytes(*paths):
    return sum(p.stat().st_size for p in paths if p.exists())


class Server:
    """One Prosody process. `modules`: archive modules to enable (none for the floor).
    `extra`: config lines (global). The data dir starts as a copy of `accounts_from` (a data dir
    holding prosody.sqlite with the accounts) when given."""

    def __init__(self, root, name, modules, plugin_dir, extra=(), accounts_from=None, launcher=()):
        self.name = name
        self.launcher = list(launcher)  # a command Prosody runs under, such as valgrind's
        self.modules = list(modules)
        self.plugin_dir = Path(plugin_dir)
        self.extra = list(extra)
        self.workdir = Path(tempfile.mkdtemp(prefix="prosody-%s-" % name, dir=root))
        self.data = self.workdir / "data"
        self.cfg = self.workdir / "prosody.cfg.lua"
        self.log = self.workdir / "prosody.log"
        self.proc = None
        self.port = None
        if accounts_from:
            shutil.copytree(accounts_from, self.data)
        else:
            self.data.mkdir()
        (self.workdir / "certs").mkdir()

    def write_config(self):
        lines = [
            "run_as_root = true",
            'pidfile = "%s"' % (self.workdir / "prosody.pid"),
            'data_path = "%s"' % self.data,
            'log = { info = "%s" }' % self.log,
            'interfaces = { "127.0.0.1" }',
            "c2s_ports = { %d }" % self.port,
            "c2s_direct_tls_ports = { }",
            "legacy_ssl_ports = { }",
            "s2s_ports = { }",
            "http_ports = { }",
            "https_ports = { }",
            "network_settings = { nagle = false }",
            "modules_enabled = { %s }" % ", ".join('"%s"' % m for m in BASE_MODULES + tuple(self.modules)),
            'modules_disabled = { "s2s" }',
            'plugin_paths = { "%s", "%s" }' % (self.plugin_dir.parent, BENCH_PLUGINS),
            'authentication = "internal_hashed"',
            "c2s_require_encryption = false",
            "allow_unencrypted_plain_auth = true",
            'storage = "sql"',
            'sql = { driver = "SQLite3", database = "prosody.sqlite" }',
            "",
            *self.extra,
            "",
            'VirtualHost "%s"' % HOST,
        ]
        self.cfg.write_text("\n".join(lines) + "\n")

    def prosodyctl(self, *args, timeout=120):
        if self.port is None:
            self.port = free_port()
            self.write_config()
        return subprocess.run(["prosodyctl", "--config", str(self.cfg), *args], capture_output=True, text=True,
                              timeout=timeout)

    def register(self, users):
        for u in users:
            r = self.prosodyctl("register", u, HOST, password(u))
            if r.returncode != 0:
                raise RuntimeError("prosodyctl register %s failed: %s %s" % (u, r.stdout, r.stderr))

    def start(self, timeout=60.0, extra=None):
        """Starts Prosody (again, on the same data dir); waits until it serves c2s and its
        modules are loaded. `extra` replaces the extra config lines."""
        assert self.proc is None
        if extra is not None:
            self.extra = list(extra)
        for attempt in range(3):
            self.port = free_port()
            self.write_config()
            offset = self.log.stat().st_size if self.log.exists() else 0
            out = open(self.workdir / "stdout.txt", "ab")
            prosody = shutil.which("prosody") or "prosody"  # a path: a launcher runs it as lua5.4's script
            self.proc = subprocess.Popen(self.launcher + [prosody, "-F", "--config", str(self.cfg)], stdout=out,
                                         stderr=subprocess.STDOUT, cwd=self.workdir)
            out.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                        pass
                except OSError:
                    time.sleep(0.05)
                    continue
                # The kernel accepts before the loop runs; once the loop has logged our probe
                # connection, start-up (module loading included) is over.
                while time.monotonic() < deadline and b"Client connected" not in self.log_bytes(offset):
                    time.sleep(0.02)
                text = self.log_bytes(offset).decode(errors="replace")
                for m in self.modules:
                    for marker in ("Unable to load module '%s'" % m, "Error initializing module '%s'" % m):
                        if marker in text:
                            self.stop()
                            raise RuntimeError("module %s failed to load:\n%s" % (m, text[-4000:]))
                self.started_at = time.time()
                return self
            self._kill()
            if b"Failed to open server port" not in self.log_bytes(offset):
                break
        raise RuntimeError("prosody did not start (%s):\n%s" % (self.workdir, self.log_bytes(0)[-4000:].decode(
            errors="replace")))

    def log_bytes(self, offset=0):
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return b""

    def log_size(self):
        return self.log.stat().st_size if self.log.exists() else 0

    def cpu(self):
        return proc_cpu_seconds(self.proc.pid)

    def thread_cpu(self):
        return thread_cpu_seconds(self.proc.pid)

    def _kill(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # our own child, by PID
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def stop(self):
        self._kill()

    def remove(self, keep=False):
        self.stop()
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
