"""Shared test fixtures: a real daemon in a fresh temp directory, and a line-protocol client.

DaemonFixture writes a config into its own temp dir, starts `jobrunnerd.py` as a subprocess
(`sys.executable`, never `python3` from PATH), waits until the socket answers (polling with a
deadline, no fixed sleeps) and stops it in tearDown. Tests talk to it with `raw()` (one socket,
JSON lines) or `jobctl.Client`.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMON = os.path.join(ROOT, "jobrunnerd.py")
JOBCTL = os.path.join(ROOT, "jobctl.py")
sys.path.insert(0, ROOT)


# Runs the daemon as `python jobrunnerd.py` does, after a test's `preamble` (Python, with the
# module as `jr`) changed a constant or wrapped a method: how a test reaches a state that would
# take long or be a race (a zygote's start deadline, a fold's child caught mid-way), with no
# switch for tests in the product.
LAUNCHER = ("import sys; sys.path.insert(0, %r); import jobrunnerd as jr; exec(sys.argv[1]);"
            " sys.exit(jr.main(sys.argv[2:]))" % ROOT)


def kill_after_commit(setup: str, condition: str) -> str:
    """A daemon preamble (see LAUNCHER): run `setup` (e.g. "jr.BULK_STEP = 5"), then SIGKILL
    the daemon right after a loop pass's journal write when `condition` (an expression of
    `self`, the Daemon) holds: a crash at a chosen point between two durable steps."""
    return ("import os, signal\n%s\n_commit = jr.Daemon.commit\n"
            "def commit(self, mark, **kwargs):\n"
            "    _commit(self, mark, **kwargs)\n"
            "    if %s:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "jr.Daemon.commit = commit\n" % (setup, condition))


def _compile_daemon_once():
    """The fixture starts its daemons through LAUNCHER (`import jobrunnerd`), which reads
    the bytecode written here once per run, instead of as a script, which compiles 7,700
    lines at every start (~75 ms of each of some 600 starts). Written even where
    PYTHONDONTWRITEBYTECODE is set; tests of the script itself run DAEMON directly."""
    import importlib.util
    import py_compile
    try:
        py_compile.compile(DAEMON, cfile=importlib.util.cache_from_source(DAEMON), doraise=True)
    except (OSError, py_compile.PyCompileError):
        pass                            # a read-only checkout: each start compiles, slower


_compile_daemon_once()


def daemon_env(**extra):
    """The test's environment without anything systemd may have given the test run itself
    (a CI runner under systemd has NOTIFY_SOCKET, maybe WATCHDOG_USEC), plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k != "NOTIFY_SOCKET" and not k.startswith(("LISTEN_", "WATCHDOG_", "JOBRUNNER_"))}
    env.update(extra)
    return env


def terminate(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM `proc` (if it still runs), SIGKILL after `timeout` s; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def temp_config(test: unittest.TestCase, prefix: str = "jr-test-", **keys):
    """(a Config whose socket, state_dir and log_dir are in a temp dir removed at the test's
    cleanup, that dir); `keys`: more config keys."""
    import jobrunnerd
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    test.addCleanup(tmp.cleanup)
    return jobrunnerd.load_config(None, {"socket": os.path.join(tmp.name, "s.sock"),
                                         "state_dir": os.path.join(tmp.name, "state"),
                                         "log_dir": os.path.join(tmp.name, "logs"),
                                         **keys}), tmp.name


def in_process_daemon(test: unittest.TestCase, cfg):
    """A jobrunnerd Daemon object set up in this process, for tests that drive it one loop
    pass at a time. The signal handlers and wakeup fd it installs are put back, and it is
    dropped at cleanup as a crash would drop it: its files closed, nothing more written."""
    import jobrunnerd
    handlers = {s: signal.getsignal(s) for s in (signal.SIGCHLD, signal.SIGTERM,
                                                 signal.SIGINT, signal.SIGHUP)}
    old_wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(old_wakeup)

    def restore():
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    test.addCleanup(restore)
    # setup() makes this process a child subreaper (jobrunnerd.Containment): undone at cleanup,
    # or the orphans of every daemon the later tests kill would come to the test process.
    import ctypes
    prctl, was = ctypes.CDLL(None, use_errno=True).prctl, ctypes.c_int(0)
    prctl(37, ctypes.byref(was), 0, 0, 0)           # PR_GET_CHILD_SUBREAPER
    test.addCleanup(prctl, jobrunnerd.PR_SET_CHILD_SUBREAPER, was.value, 0, 0, 0)
    import gc
    test.addCleanup(gc.set_threshold, *gc.get_threshold())     # setup() sets the daemon's
    daemon = jobrunnerd.Daemon(cfg)

    def drop():
        for conn in list(daemon.conns):
            daemon.close(conn)
        for sock in (daemon.listener, daemon.wake_r, daemon.wake_w):
            if sock is not None:
                sock.close()
        daemon.runner.close()
        if daemon.log is not None:
            daemon.log.close()
        daemon.loop.sel.close()
        daemon.store.close()
    test.addCleanup(drop)
    daemon.setup()
    return daemon


def client_of(test: unittest.TestCase, daemon):
    """A client connection to an in_process_daemon(), made as its listener would accept one:
    (the daemon's Connection, the test's end of the socket pair)."""
    import functools
    import selectors
    import jobrunnerd
    ours, theirs = socket.socketpair()
    test.addCleanup(theirs.close)
    ours.setblocking(False)
    conn = jobrunnerd.Connection(ours, os.getuid())
    conn.on_event = functools.partial(daemon.on_client, conn)
    daemon.conns.add(conn)
    daemon.loop.watch(conn.fd, selectors.EVENT_READ, "client", conn.on_event)
    test.addCleanup(daemon.close, conn)
    return conn, theirs


def job_table(test: unittest.TestCase, directory: str, cfg, clock):
    """A JobTable on a Store and an EventLog in `directory` (no fsync), its Scheduler
    configured from `cfg`, loaded from what is there: the parts a loop pass drives, stepped
    with `clock` and no daemon."""
    import jobrunnerd
    state, logs = os.path.join(directory, "state"), os.path.join(directory, "logs")
    os.makedirs(state, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    store = jobrunnerd.Store(state, fsync=False)
    test.addCleanup(store.close)
    meta, records = store.load()
    log = jobrunnerd.EventLog(logs, clock=clock)
    test.addCleanup(log.close)
    scheduler = jobrunnerd.Scheduler(1)
    scheduler.configure(cfg)
    table = jobrunnerd.JobTable(store, log, clock=clock, scheduler=scheduler)
    table.load(meta, records)
    return table


def jobctl_loads(names, *args) -> list:
    """Which of the modules `names` a run of `jobctl.py ARGS` (against a socket that is not
    there) has imported when it ends: run in a process of its own, seen in its sys.modules."""
    probe = ("import sys; sys.argv = ['jobctl.py', '--socket', '/nonexistent/x.sock'] + "
             "sys.argv[1:]; import runpy\n"
             "try:\n    runpy.run_path(%r, run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print(sorted(m for m in %r if m in sys.modules))" % (JOBCTL, tuple(names)))
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                         timeout=30)
    import ast
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])    # its last line: a list


def jobctl_importtime(*args) -> tuple[int, set]:
    """(exit status, every module imported) of `python -X importtime jobctl.py ARGS` against
    a socket that is not there."""
    out = subprocess.run([sys.executable, "-X", "importtime", JOBCTL, "--socket",
                          "/nonexistent/x.sock", *args], capture_output=True, text=True,
                         timeout=30)
    return out.returncode, {line.split("|")[-1].strip() for line in out.stderr.splitlines()
                            if line.startswith("import time:")}


def wait_until(predicate, timeout=10.0, interval=0.01, message="condition"):
    """Poll `predicate` until it returns a true value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, message))
        time.sleep(interval)


_NOTES = re.compile(r"(?m)^\[jobrunner\] attempt .*\n(?:    .*\n)*")


def job_output(data):
    """What the job itself printed: an output file's text or bytes (or `output` data) without
    the daemon's lines, "[jobrunner] attempt ..." and the indented lines of a traceback."""
    if isinstance(data, bytes):
        return _NOTES.sub("", data.decode("utf-8", "surrogateescape")).encode(
            "utf-8", "surrogateescape")
    return _NOTES.sub("", data)


def children_named(parent: int, word: bytes) -> list[int]:
    """Processes whose parent is `parent` and whose command line has `word` (pgrep -P -f, by
    hand: pgrep may not be installed)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open("/proc/%s/cmdline" % name, "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue                # not a process, or gone meanwhile
        if ppid == parent and word in cmdline:
            found.append(int(name))
    return found


class Raw:
    """One connection speaking the line protocol directly."""

    def __init__(self, path, timeout=30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rb")

    def send_line(self, data: bytes):
        self.sock.sendall(data)

    def send(self, **req):
        self.sock.sendall((json.dumps(req) + "\n").encode())

    def recv(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("connection closed by the daemon")
        return json.loads(line)

    def call(self, **req):
        try:
            self.send(**req)
        except (BrokenPipeError, ConnectionResetError):
            pass    # the daemon refused unprompted (busy, forbidden) and closed: its line waits
        return self.recv()

    def close(self):
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Daemon:
    """A jobrunnerd subprocess on its own state, logs and socket under `root`."""

    def __init__(self, root, **config):
        self.root = root
        self.socket = os.path.join(root, "jobrunnerd.sock")
        self.state_dir = os.path.join(root, "state")
        self.log_dir = os.path.join(root, "logs")
        self.config_path = os.path.join(root, "jobrunnerd.toml")
        self.config = {"socket": self.socket, "state_dir": self.state_dir,
                       "log_dir": self.log_dir, "job_paths": [ROOT, os.path.join(root, "jobs")],
                       "workers": 2, "kill_grace": 1, "shutdown_grace": 5,
                       # the product's default; JOBRUNNER_TEST_START_METHOD=spawn runs the
                       # whole suite on the other path
                       "start_method": os.environ.get("JOBRUNNER_TEST_START_METHOD", "zygote")}
        self.config.update(config)
        self.proc = None
        self.preamble: str | None = None    # see LAUNCHER
        self.stderr_path = os.path.join(root, "daemon.stderr")

    def write_config(self):
        with open(self.config_path, "w") as f:
            for key, value in self.config.items():
                f.write("%s = %s\n" % (key, toml_value(value)))

    def start(self, wait=True, env=None, args=()):
        """Start the daemon with `env` (by default, daemon_env())."""
        self.write_config()
        self.stderr = open(self.stderr_path, "ab")
        env = daemon_env() if env is None else env
        command = [sys.executable, "-c", LAUNCHER, self.preamble or ""]
        self.proc = subprocess.Popen([*command, "--config", self.config_path,
                                      *args], stdin=subprocess.DEVNULL, stdout=self.stderr,
                                     stderr=self.stderr, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=15.0):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError("daemon exited with %s: %s"
                                     % (self.proc.returncode, self.read_stderr()))
            try:
                with Raw(self.socket, timeout=2) as c:
                    return c.call(op="hello")["ok"]
            except OSError:
                return False
        wait_until(ready, timeout, message="the daemon's socket to answer")

    def read_stderr(self):
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def raw(self, timeout=30.0):
        return Raw(self.socket, timeout)

    def call(self, **req):
        with self.raw() as c:
            return c.call(**req)

    def add(self, target="examples.jobs:ExampleJob", **fields):
        reply = self.call(op="add", target=target, **fields)
        assert reply["ok"], reply
        return reply["id"]

    def wait_job(self, job_id, timeout=30.0):
        reply = self.call(op="wait", id=job_id, timeout=timeout)
        assert reply["ok"] and reply["done"], reply
        return reply["job"]

    def get(self, job_id):
        reply = self.call(op="get", id=job_id)
        assert reply["ok"], reply
        return reply["job"]

    def wait_state(self, job_id, state, timeout=15.0):
        return wait_until(lambda: self.get(job_id)["state"] == state and self.get(job_id),
                          timeout, message="job %d to be %s" % (job_id, state))

    def stop(self, sig=signal.SIGTERM, timeout=30.0):
        """Send `sig` and wait for the process; returns its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.stderr.close()

    def kill(self):
        return self.stop(signal.SIGKILL)

    def events(self):
        """background_jobs.log as a list of dicts (key=value pairs; quoted values decoded)."""
        path = os.path.join(self.log_dir, "background_jobs.log")
        with open(path, encoding="utf-8") as f:
            return [parse_log_line(line) for line in f]

    def job_events(self, job_id, event=None):
        """The log lines of job `job_id` (only those of `event`, if given), in order."""
        return [e for e in self.events()
                if e.get("job") == str(job_id) and (event is None or e["event"] == event)]

    def jobctl(self, *args, input=None, timeout=60.0, env=None):
        """Run `jobctl.py --socket ... ARGS`, with `env` (a dict) added to the environment;
        returns CompletedProcess (text)."""
        return subprocess.run([sys.executable, JOBCTL, "--socket", self.socket, *args],
                              input=input, capture_output=True, text=True, timeout=timeout,
                              env=None if env is None else {**os.environ, **env})


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join("%s = %s" % (k, toml_value(v)) for k, v in value.items()) + "}"
    raise TypeError(value)


def parse_log_line(line):
    """'2026-...Z event=x job=1 error="a \\"b\\""' -> {"time": ..., "event": "x", ...}"""
    line = line.rstrip("\n")
    time_part, _, rest = line.partition(" ")
    out = {"time": time_part}
    i = 0
    while i < len(rest):
        eq = rest.index("=", i)
        key = rest[i:eq]
        i = eq + 1
        if i < len(rest) and rest[i] == '"':
            j = i + 1
            buf = []
            while rest[j] != '"':
                if rest[j] == "\\":
                    nxt = rest[j + 1]
                    if nxt == "x":
                        buf.append(chr(int(rest[j + 2:j + 4], 16)))
                        j += 4
                        continue
                    if nxt == "u":
                        buf.append(chr(int(rest[j + 2:j + 6], 16)))
                        j += 6
                        continue
                    buf.append({"n": "\n", "r": "\r", "t": "\t"}.get(nxt, nxt))
                    j += 2
                    continue
                buf.append(rest[j])
                j += 1
            out[key] = "".join(buf)
            i = j + 2
        else:
            end = rest.find(" ", i)
            end = len(rest) if end < 0 else end
            out[key] = rest[i:end]
            i = end + 1
    return out


class DaemonTestCase(unittest.TestCase):
    """A fresh daemon per test; override `config` for other settings."""

    config: dict = {}
    daemon_env: dict = {}       # added to the daemon's environment
    daemon_preamble: str | None = None      # run before the daemon's main(): see LAUNCHER

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="jr-test-")
        self.root = self._tmp.name
        os.makedirs(os.path.join(self.root, "jobs"))
        self.daemon = Daemon(self.root, **self.config)
        self.daemon.preamble = self.daemon_preamble
        self.addCleanup(self._tmp.cleanup)
        self.addCleanup(self._stop_daemon)
        self.prepare()
        self.daemon.start(env=daemon_env(**self.daemon_env))

    def prepare(self):
        """Runs before the daemon starts (the temp dir and jobs/ exist): override to set up."""

    def _stop_daemon(self):
        d = self.daemon
        if d.proc is not None and d.proc.poll() is None:
            # The test is over: its jobs still running are cancelled first, so that the stop
            # does not wait shutdown_grace for them (5 s each). Tests of the graceful stop
            # itself stop their daemon in the test.
            try:
                with Raw(d.socket, timeout=5) as c:
                    c.call(op="cancel", where={"state": "running"})
            except (OSError, ValueError):
                pass                    # not serving (any more): the stop below decides
            try:
                d.stop(signal.SIGTERM, timeout=30)
            except subprocess.TimeoutExpired:
                pass                    # the test fails elsewhere; never leave it running
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()

    def write_job_module(self, name, source):
        """A job module in this test's own job path (jobs/NAME.py)."""
        with open(os.path.join(self.root, "jobs", name + ".py"), "w") as f:
            f.write(source)
