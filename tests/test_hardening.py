"""Hardening (issue 4): who may talk to the daemon, what bad input gets, what a job may do.

What tests/test_e2e_protocol.py and tests/test_units.py do not already cover:

    FuzzTest              a seeded fuzzer: >= 10,000 request lines made by mutating a valid
                          request of every op, pipelined in chunks over a few connections, every
                          reply read. The daemon stays up; every reply is a JSON object with a
                          boolean `ok`; every error has a SPEC code and a string message; lines
                          the SPEC answers one way (not UTF-8, not JSON, not an object, no `op`,
                          unknown op, unknown field, one ill-typed field, too long) get that
                          answer. Afterwards the state it left restarts cleanly.
                              JOBRUNNER_FUZZ_LINES=N   lines to send (default 10000)
                              JOBRUNNER_FUZZ_SEED=S    the random seed (default FUZZ_SEED)
                          e.g. JOBRUNNER_FUZZ_LINES=200000 python3 -m unittest \\
                                   tests.test_hardening.FuzzTest
                          It prints one line to stderr: lines, seed, seconds. A failure names
                          the seed, the line's index and the line, so it can be replayed.
    ConnectionsTest       300 connections at once against max_connections = 256.
    StalledClientTest     half a line, then silence; a connection that sends nothing.
    GarbageTest           5,000 lines of garbage in one write beside a normal client.
    NonReaderTest         a client that pipelines big `list` requests and never reads.
    OversizeTest          max_request_bytes exactly (in bytes, not characters) and one above.
    SocketTest            socket file mode, the directory the daemon makes for it, a path that
                          is not a socket, the peer uid on the `queued` line, target syntax.
    AllowReloadTest       SIGHUP narrows the allow list: a queued job fails once, not retried.
    LimitsTest            limits = {cpu, memory, nofile, fsize} and core dumps off, in the job.
    IsolationTest         PYTHON* variables of the daemon do not reach the job's interpreter.
    LogInjectionTest      an exception class name and message built to forge log lines.

"Served within 1 s" is measured with LatencyProbe: hellos pipelined on a connection of their
own every 50 ms while the disturbance goes on, each timed from its send to its reply; the median
must stay under 1 s. A loop that blocks for seconds delays every probe sent meanwhile, so the
median catches it, while one late probe on a machine busy with other tests does not fail it.
No fixed sleeps: polls have deadlines, threads are joined with timeouts.
"""
import errno
import json
import os
import random
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import unittest

from tests.support import DaemonTestCase, Raw, daemon_env, parse_log_line, wait_until


T = "examples.jobs:ExampleJob"
ALLOW = ["examples.*:*", "testjobs*:*"]
# SPEC §3, literally: a new code needs a SPEC change.
SPEC_ERROR_CODES = frozenset({
    "bad_request", "unknown_op", "not_allowed", "not_found", "invalid_state", "too_large",
    "queue_full", "forbidden", "busy", "shutting_down", "io_error"})
# SPEC §3 table: op -> request fields besides "op".
SPEC_OP_FIELDS = {
    "hello": (), "add": ("target", "method", "args", "kwargs", "priority", "delay", "run_at",
                         "retries", "retry_delay", "backoff", "timeout", "key", "queue",
                         "after", "on_parent_failure"),
    "add_batch": ("jobs",), "get": ("id",),
    "list": ("state", "target", "queue", "schedule", "limit", "order", "after_id", "before_id"),
    "cancel": ("id", "where"), "retry": ("id", "where"), "wait": ("id", "timeout"),
    "output": ("id", "offset", "limit"), "stats": (), "pause": ("queue", "schedule"),
    "resume": ("queue", "schedule"), "prune": ("older_than",), "queues": (),
    "set_workers": ("queue", "workers"), "schedules": (), "trigger": ("schedule",),
    "metrics": (), "activity": (),
    "update": ("id", "priority", "delay", "run_at", "queue"),
}
LOG_LINE_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z event=[a-z_]+( |\Z)")
LATENCY_BOUND = 1.0         # issue 4: "keeps serving a well-behaved client within 1 s"
FUZZ_SEED = 20261128
FUZZ_LINES = 10000

# Written as jobs/testjobs_hard.py where a test needs it.
JOB_MODULE = r'''
import os, resource, sys

def burn():
    while True:
        pass

def open_files(directory, n):
    files = [open(os.path.join(directory, "f%d" % i), "w") for i in range(n)]
    return len(files)

def write_bytes(path, n):
    with open(path, "wb") as f:
        f.write(b"x" * n)
    return n

def allocate(n):
    return len(bytearray(n))

def limits():
    names = ("RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_FSIZE")
    return {name: list(resource.getrlimit(getattr(resource, name))) for name in names}

def isolation(probe_module):
    import importlib.util
    site = sys.modules.get("sitecustomize")
    return {"isolated": sys.flags.isolated, "ignore_environment": sys.flags.ignore_environment,
            "no_user_site": sys.flags.no_user_site, "inspect": sys.flags.inspect,
            "path": sys.path, "sitecustomize": getattr(site, "__file__", None),
            "probe_found": importlib.util.find_spec(probe_module) is not None,
            "watchdog": sorted(k for k in os.environ if k.startswith("WATCHDOG_")),
            "core": list(resource.getrlimit(resource.RLIMIT_CORE))}

def forge(name, message):
    raise type(name, (Exception,), {})(message)
'''


####################################################################################################
#  Helpers
####################################################################################################

def vm_rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS for pid %d" % pid)


def timed(fn):
    start = time.monotonic()
    value = fn()
    return time.monotonic() - start, value


def reply_problem(raw, expect=None):
    """What is wrong with one reply line (bytes), or None. `expect`: the error codes SPEC allows
    for this request, or None when any well-formed reply will do."""
    try:
        reply = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        return "reply is not a JSON line: %s" % exc
    if not isinstance(reply, dict):
        return "reply is not a JSON object"
    if not isinstance(reply.get("ok"), bool):
        return "reply has no boolean 'ok'"
    if reply["ok"] is False:
        error = reply.get("error")
        if not isinstance(error, dict) or set(reply) != {"ok", "error"}:
            return "error reply without an 'error' object (or with extra fields)"
        if error.get("code") not in SPEC_ERROR_CODES:
            return "error code %r is not one of SPEC's" % (error.get("code"),)
        if not isinstance(error.get("message"), str):
            return "error message is not a string"
    elif "error" in reply:
        return "'ok': true together with 'error'"
    if expect is not None and (reply["ok"] or reply["error"]["code"] not in expect):
        return "expected an error with code %s" % " or ".join(sorted(expect))
    return None


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


class LatencyProbe:
    """Hellos pipelined on one connection every `interval` s (a writer thread) and their replies
    timed (a reader thread). stop() returns the round-trip times, one per hello."""

    def __init__(self, path, interval=0.05):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.interval = interval
        self.sent, self.rtts, self.errors = [], [], []
        self.halt = threading.Event()
        self.writer = threading.Thread(target=self._write, daemon=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.writer.start()
        self.reader.start()

    def _write(self):
        try:
            while not self.halt.is_set():
                self.sent.append(time.monotonic())     # before the send: the reader needs it
                self.sock.sendall(b'{"op": "hello"}\n')
                self.halt.wait(self.interval)        # the pace of the probes, not a sync
            self.sock.shutdown(socket.SHUT_WR)       # the daemon answers the rest, then closes
        except OSError as exc:
            self.errors.append("probe send: %r" % exc)

    def _read(self):
        try:
            while True:
                line = self.file.readline()
                if not line:
                    break
                self.rtts.append(time.monotonic() - self.sent[len(self.rtts)])
                problem = reply_problem(line)
                if problem or not json.loads(line)["ok"]:
                    self.errors.append("probe reply %r: %s" % (line[:200], problem))
            if len(self.rtts) < len(self.sent):
                self.errors.append("probe connection closed with %d hellos unanswered"
                                   % (len(self.sent) - len(self.rtts)))
        except OSError as exc:
            self.errors.append("probe read: %r" % exc)

    def stop(self, timeout=60.0):
        self.halt.set()
        self.writer.join(timeout)
        self.reader.join(timeout)
        self.file.close()
        self.sock.close()
        return self.rtts

    def summary(self):
        r = sorted(self.rtts)
        if not r:
            return "no probe answered"
        return "%d probes: median %.3fs, max %.3fs, %d over %.1fs" % (
            len(r), statistics.median(r), r[-1], sum(x > LATENCY_BOUND for x in r),
            LATENCY_BOUND)


class HardeningCase(DaemonTestCase):
    """DaemonTestCase plus assertions on reply shapes and latency."""

    def assertError(self, reply, code, msg=None):
        self.assertIs(reply.get("ok"), False, msg or reply)
        self.assertEqual(set(reply), {"ok", "error"}, msg or reply)
        self.assertEqual(reply["error"]["code"], code, msg or reply)
        self.assertIsInstance(reply["error"]["message"], str, msg or reply)
        return reply

    def assertOk(self, reply, msg=None):
        self.assertIs(reply.get("ok"), True, msg or reply)
        return reply

    def assertAlive(self):
        code = self.daemon.proc.poll()
        if code is not None:
            self.fail("the daemon exited with status %s; stderr tail:\n%s"
                      % (code, self.daemon.read_stderr()[-2000:]))

    def assertProbeFast(self, probe, what, probes=10):
        # at least `probes` hellos sent: the sample, not a synchronisation
        wait_until(lambda: len(probe.sent) >= probes or probe.errors, 60,
                   message="%d probes to be sent" % probes)
        probe.stop()
        self.assertFalse(probe.errors, probe.errors[:3])
        self.assertGreaterEqual(len(probe.rtts), 3, "too few probes answered")
        self.assertLess(statistics.median(probe.rtts), LATENCY_BOUND,
                        "a well-behaved client was not served within %.1fs %s: %s"
                        % (LATENCY_BOUND, what, probe.summary()))

    def assertRoundTripsFast(self, conn, what, n=5, **req):
        """`n` sequential round trips of `req` (default hello) on `conn`; median < 1 s."""
        req = req or {"op": "hello"}
        times = []
        for _ in range(n):
            took, reply = timed(lambda: conn.call(**req))
            self.assertOk(reply)
            times.append(took)
        self.assertLess(statistics.median(times), LATENCY_BOUND,
                        "%s: round trips %s" % (what, ["%.3f" % t for t in times]))
        return times

    def pause(self):
        self.assertOk(self.daemon.call(op="pause"))

    def wait_done(self, job_id, timeout=60.0):
        reply = self.daemon.call(op="wait", id=job_id, timeout=timeout)
        self.assertOk(reply)
        self.assertIs(reply["done"], True, reply)
        return reply["job"]

    def read_log(self, name):
        with open(os.path.join(self.daemon.log_dir, name), encoding="utf-8") as f:
            return f.read()

    def path(self, *names):
        return os.path.join(self.root, *names)


####################################################################################################
#  The fuzzer
####################################################################################################

class RawJSON(str):
    """A field value written into the request line verbatim (not valid JSON, or not a value
    json.dumps can make: NaN, 1e999, 5,000 digits, nesting deeper than the encoder goes)."""


# Values of the wrong JSON type for each kind of field (null left out: "absent" and "null" are
# close enough that SPEC does not make every null a bad_request).
WRONG = {
    "int": ["1", "", 1.5, True, False, [], [1], {}, {"a": 1}],
    "number": ["1", "", "1.5", True, False, [], [0.5], {}],
    "str": [1, 0, -1.5, True, False, [], ["x"], {}, {"a": "b"}],
    "list": ["", "x", 0, 1, True, False, {}, {"a": 1}],
    "object": ["", "x", 0, 1, True, False, [], [1]],
}
# SPEC §3/§2: the JSON type of each request field (a swap to another type is a bad_request).
FIELD_KINDS = {
    "target": "str", "method": "str", "args": "list", "kwargs": "object", "priority": "int",
    "delay": "number", "run_at": "number", "retries": "int", "retry_delay": "number",
    "backoff": "str", "timeout": "number", "key": "str", "jobs": "list", "id": "int",
    "state": "str", "limit": "int", "after_id": "int", "offset": "int", "older_than": "number",
}
NUMERIC_FIELDS = ("priority", "delay", "run_at", "retries", "retry_delay", "timeout", "id",
                  "limit", "after_id", "offset", "older_than")
EXTREME_NUMBERS = [0, -1, 1, -0.0, 0.0001, 1e-300, 5e-324, 1e308, -1e308, 2 ** 31, -2 ** 31 - 1,
                   2 ** 53 + 1, 2 ** 63, -2 ** 63, 2 ** 64, 10 ** 30, -10 ** 30, 10 ** 400,
                   315360001, 1000, 1001, 65536, 4 * 1024 * 1024 + 1, RawJSON("NaN"),
                   RawJSON("Infinity"), RawJSON("-Infinity"), RawJSON("1e999"),
                   RawJSON("-1e999"), RawJSON("9" * 5000), RawJSON("-0"), RawJSON("1E400"),
                   RawJSON("0.0000000000000000000000000001"), RawJSON("01"), RawJSON("+1"),
                   RawJSON(".5"), RawJSON("1."), RawJSON("0x10")]
ODD_STRINGS = ["", " ", "x", "null", "1", "é😀", "\u2028", "\x00", "\x1b[31m", "\ud800",
               "examples.jobs:ExampleJob", "examples.jobs:Nope", "examples/jobs:X", "../x:y",
               "os:system", "examples.jobs:_private", "__init__", "handle", "pending", "fixed",
               "$(touch pwned)", "a" * 300, "*", "[", "examples.*"]
ODD_OPS = ["HELLO", "nope", "", " add", "add ", "add\x00", "_hello", "__class__", "handlers",
           "op_add", "hello\n", "wait", "resume", "prune"]
UNKNOWN_FIELDS = ["priorty", "x", "", "ID", "Op", "op ", "é", "__proto__", "constructor",
                  "jobs", "id", "target", "uid", "pid", "state"]
INSERTS = ([b"\x00", b"\x7f", b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80",
            b"\xe2\x82", b"\xf0\x9f\x98", b"\xf4\x90\x80\x80", b"\xef\xbb\xbf", b'"', b"\\",
            b"{", b"}", b"[", b"]", b",", b":", b" ", b"NaN", b"Infinity", b"-", b"1e999",
            b"\\u0000", b"\\ud800", b"\\udc00", b"\\u2028", b"\\", b"\r", b"\t"]
           + [bytes([c]) for c in range(0x20) if c != 0x0A])


class LineMaker:
    """Request lines for the fuzzer: a valid request of a random op, mutated at the level of
    its fields, of its bytes, or both. next() -> (line without "\\n", expected error codes or
    None). It never makes a line that would run a job (no `resume`) or hold the pipeline (a
    `wait` that might block gets its timeout pinned to 0)."""

    def __init__(self, rng, max_bytes):
        self.rng = rng
        self.max_bytes = max_bytes

    def seed(self):
        rng = self.rng
        job_id = lambda: rng.choice([1, 2, 3, rng.randint(1, 80)])    # noqa: E731
        now = float(int(time.time()))  # of one length: the seed alone fixes the mutations
        return rng.choice([
            [("op", "hello")],
            [("op", "add"), ("target", T), ("method", "handle"),
             ("args", ["a", 1, None, {"k": [1.5, True]}]), ("kwargs", {}), ("priority", 5),
             ("delay", 30), ("retries", 2), ("retry_delay", 0.5), ("backoff", "fixed"),
             ("timeout", 60), ("key", "k%d" % rng.randint(0, 30))],
            [("op", "add"), ("target", "examples.jobs:echo"), ("args", ["x", "é"]),
             ("kwargs", {"a": "b"}), ("run_at", now + 60), ("backoff", "exponential"),
             ("timeout", None), ("method", None), ("key", None)],
            [("op", "add"), ("target", "examples.jobs:Outer.Inner")],
            [("op", "add_batch"), ("jobs", [
                {"target": T, "args": [1]},
                {"target": "examples.jobs:add", "args": [1, 2], "priority": -3,
                 "key": "b%d" % rng.randint(0, 30)}])],
            [("op", "get"), ("id", job_id())],
            [("op", "list"), ("state", rng.choice(["pending", "cancelled", "failed"])),
             ("target", "examples.*"), ("limit", rng.randint(1, 20)),
             ("after_id", rng.randint(0, 50))],
            [("op", "list")],
            [("op", "cancel"), ("id", job_id())],
            [("op", "retry"), ("id", job_id())],
            [("op", "wait"), ("id", job_id()), ("timeout", 0)],
            [("op", "output"), ("id", job_id()), ("offset", 0), ("limit", 100)],
            [("op", "stats")],
            [("op", "pause")],
            [("op", "resume")],
            [("op", "prune"), ("older_than", 3600)],
        ])

    def value(self):
        rng = self.rng
        kind = rng.randrange(8)
        if kind == 0:
            return rng.choice(EXTREME_NUMBERS)
        if kind == 1:
            return rng.choice(ODD_STRINGS)
        if kind == 2:
            return rng.choice([None, True, False, [], {}, [None], {"": None}, [[[]]]])
        if kind == 3:
            return self.nested()
        if kind == 4 and rng.random() < 0.2:
            return self.long_string()
        if kind == 5:
            return [self.value() for _ in range(rng.randint(0, 4))]
        if kind == 6:
            return {rng.choice(ODD_STRINGS): rng.choice(EXTREME_NUMBERS[:20])}
        return rng.randint(-10, 100)

    def nested(self):
        depth = self.rng.choice([2, 10, 63, 64, 65, 100, 999, 1000, 5000, 20000, 30000])
        if self.rng.random() < 0.5:
            return RawJSON("[" * depth + "]" * depth)
        return RawJSON('{"a":' * depth + "1" + "}" * depth)

    def long_string(self):
        n = self.rng.choice([1000, 5000, 30000, 60000, 70000, 100000])
        if self.rng.random() < 0.5:
            n //= 2
        return self.rng.choice(["x", "é", "😀", "\\"]) * n

    def encode(self, pairs):
        ascii_only = self.rng.random() < 0.5
        sep = self.rng.choice([", ", ",", " , "])

        def one(v):
            if isinstance(v, RawJSON):
                return str(v)
            return json.dumps(v, ensure_ascii=ascii_only)
        text = "{" + sep.join(json.dumps(k) + ": " + one(v) for k, v in pairs) + "}"
        return text.encode("utf-8", "surrogatepass")

    def mutate_fields(self, pairs):
        """One change to the field list; returns the new list and, when the change was a type
        swap of a typed field, that field's name."""
        rng = self.rng
        pairs = list(pairs)
        kind = rng.choice(["delete", "duplicate", "swap", "swap", "value", "extreme", "unknown",
                           "op", "nest", "long", "wrap"])
        fields = [i for i, (k, _) in enumerate(pairs) if k != "op"]
        if kind == "delete" and pairs:
            del pairs[rng.randrange(len(pairs))]
        elif kind == "duplicate" and pairs:
            k, v = pairs[rng.randrange(len(pairs))]
            pairs.insert(rng.randrange(len(pairs) + 1), (k, v if rng.random() < 0.5
                                                         else self.value()))
        elif kind == "swap" and any(pairs[i][0] in FIELD_KINDS for i in fields):
            i = rng.choice([i for i in fields if pairs[i][0] in FIELD_KINDS])
            k = pairs[i][0]
            pairs[i] = (k, rng.choice(WRONG[FIELD_KINDS[k]]))
            return pairs, k
        elif kind == "value" and pairs:
            i = rng.randrange(len(pairs))
            pairs[i] = (pairs[i][0], self.value())
        elif kind == "extreme":
            numeric = [i for i in fields if pairs[i][0] in NUMERIC_FIELDS]
            name = rng.choice(NUMERIC_FIELDS)
            if numeric and rng.random() < 0.7:
                i = rng.choice(numeric)
                pairs[i] = (pairs[i][0], rng.choice(EXTREME_NUMBERS))
            else:
                pairs.append((name, rng.choice(EXTREME_NUMBERS)))
        elif kind == "unknown":
            pairs.insert(rng.randrange(len(pairs) + 1), (rng.choice(UNKNOWN_FIELDS), self.value()))
        elif kind == "op":
            new = rng.choice([rng.choice(ODD_OPS), rng.choice(list(SPEC_OP_FIELDS)), self.value()])
            pairs = [("op", new) if k == "op" else (k, v) for k, v in pairs] or [("op", new)]
        elif kind == "nest" and pairs:
            i = rng.randrange(len(pairs))
            pairs[i] = (pairs[i][0], self.nested())
        elif kind == "long" and pairs:
            i = rng.randrange(len(pairs))
            pairs[i] = (pairs[i][0], self.long_string())
        elif kind == "wrap":
            return [("__wrap__", rng.choice(["list", "string", "two", "trailing", "nested"]))] \
                + pairs, None
        return pairs, None

    def mutate_bytes(self, data):
        rng = self.rng
        kind = rng.choice(["flip", "replace", "truncate", "insert", "insert", "delete", "dup"])
        if not data:
            return bytearray(rng.choice(INSERTS))
        p = rng.randrange(len(data))
        if kind == "flip":
            data[p] ^= 1 << rng.randrange(8)
        elif kind == "replace":
            data[p] = rng.randrange(256)
        elif kind == "truncate":
            del data[p:]
        elif kind == "insert":
            data[p:p] = rng.choice(INSERTS) if rng.random() < 0.8 else rng.randbytes(
                rng.randint(1, 16))
        elif kind == "delete":
            del data[p:p + rng.randint(1, 20)]
        else:
            data[p:p] = data[rng.randrange(len(data)):][:rng.randint(1, 40)]
        return data

    def next(self):
        rng = self.rng
        pairs = self.seed()
        typed = None
        r = rng.random()
        if r < 0.08:
            n_fields, n_bytes = 0, 0                    # a valid request now and then
        elif r < 0.45:
            n_fields, n_bytes = rng.choice([1, 1, 1, 2, 3]), 0
        elif r < 0.75:
            n_fields, n_bytes = 0, rng.randint(1, 4)
        else:
            n_fields, n_bytes = rng.randint(1, 2), rng.randint(1, 3)
        for _ in range(n_fields):
            pairs, swapped = self.mutate_fields(pairs)
            typed = swapped if n_fields == 1 else None
        wrap = None
        if pairs and pairs[0][0] == "__wrap__":
            wrap = pairs[0][1]
            pairs = [p for p in pairs if p[0] != "__wrap__"]
        data = self.encode(pairs)
        if wrap == "list":
            data = b"[" + data + b"]"
        elif wrap == "string":
            data = json.dumps(data.decode("utf-8", "replace")).encode()
        elif wrap == "two":
            data = data + b" " + data
        elif wrap == "trailing":
            data = data + b" x"
        elif wrap == "nested":
            data = b'{"op": ' + data + b"}"
        data = bytearray(data)
        for _ in range(n_bytes):
            data = self.mutate_bytes(data)
        if n_bytes:
            typed = None
        line = bytes(data).replace(b"\n", b"")
        line, rewritten = self.defuse(line)
        return line, self.expect(line, None if rewritten else typed)

    def defuse(self, line):
        """No job may run (`resume` -> `pause`) and no `wait` may block the pipeline."""
        obj = self.parse(line)
        if not isinstance(obj, dict):
            return line, False
        op = obj.get("op")
        if op == "resume":
            obj["op"] = "pause"
        elif op == "wait":
            timeout = obj.get("timeout")
            number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
            if timeout is not None and not number:
                return line, False                  # ill-typed: never blocks
            if number and timeout <= 0.05:
                return line, False
            obj["timeout"] = self.rng.choice([0, 0.01])
        else:
            return line, False
        return json.dumps(obj).encode(), True

    @staticmethod
    def parse(line):
        try:
            return json.loads(line.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None

    def expect(self, line, swapped):
        """The error codes SPEC allows for `line`, or None when any well-formed reply will do.
        `swapped`: the one field of an otherwise valid request given a value of the wrong type.
        Which error wins when a request has two faults is not SPEC's business: an unknown field
        or an ill-typed one must be refused, as a bad_request unless another fault (an id that
        does not exist, a full queue) is reported first."""
        if len(line) > self.max_bytes:
            return {"too_large"}
        obj = self.parse(line)
        if not isinstance(obj, dict):
            return {"bad_request"}
        op = obj.get("op")
        if not isinstance(op, str):
            return {"bad_request"}
        if op not in SPEC_OP_FIELDS:
            return {"unknown_op", "bad_request"}
        if set(obj) - {"op"} - set(SPEC_OP_FIELDS[op]):
            return {"bad_request", "not_found", "not_allowed", "queue_full", "invalid_state"}
        if swapped:
            codes = {"bad_request"}
            if op in ("add", "add_batch"):
                codes.add("queue_full")
            if "id" in SPEC_OP_FIELDS[op] and swapped != "id":
                codes.add("not_found")
            return codes
        return None


class FuzzConn:
    """A non-blocking connection for the fuzzer."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buf = bytearray()

    def close(self):
        self.sock.close()


def exchange(rounds, stall=15.0):
    """rounds: [(conn, payload, n_replies)]. Writes every payload while reading replies, until
    each connection has its n replies or is closed, or nothing moved for `stall` seconds.
    Returns [(replies, closed)] in the same order."""
    sel = selectors.DefaultSelector()
    states = []
    for conn, payload, n in rounds:
        st = {"conn": conn, "out": memoryview(payload), "replies": [], "n": n, "closed": False}
        sel.register(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, st)
        states.append(st)
    last = time.monotonic()
    try:
        while any(not st["closed"] and len(st["replies"]) < st["n"] for st in states):
            events = sel.select(0.2)
            if not events:
                if time.monotonic() - last > stall:
                    break
                continue
            last = time.monotonic()
            for key, mask in events:
                st = key.data
                sock = st["conn"].sock
                if mask & selectors.EVENT_WRITE and st["out"]:
                    try:
                        sent = sock.send(st["out"][:1 << 16])
                        st["out"] = st["out"][sent:]
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        st["out"] = st["out"][:0]
                    if not st["out"]:
                        sel.modify(sock, selectors.EVENT_READ, st)
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(1 << 20)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        st["closed"] = True
                        sel.unregister(sock)
                        continue
                    buf = st["conn"].buf
                    buf += data
                    while True:
                        end = buf.find(b"\n")
                        if end < 0:
                            break
                        st["replies"].append(bytes(buf[:end]))
                        del buf[:end + 1]
    finally:
        sel.close()
    return [(st["replies"], st["closed"]) for st in states]


def read_to_eof(sock, timeout=10.0):
    """Everything until the daemon closes (a reset after its last bytes counts as the close)."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


class FuzzTest(HardeningCase):
    # Small enough that the fuzzer's long lines reach too_large; a live-job cap, so the fuzzer's
    # adds meet queue_full and its `list` replies stay small. The default allow list: examples.
    config = {"max_request_bytes": 65536, "max_queued": 500}
    CONNECTIONS = 3

    def test_fuzz(self):
        n_lines = int(os.environ.get("JOBRUNNER_FUZZ_LINES", FUZZ_LINES))
        seed = int(os.environ.get("JOBRUNNER_FUZZ_SEED", FUZZ_SEED))
        rng = random.Random(seed)
        limit = self.daemon.config["max_request_bytes"]
        maker = LineMaker(rng, limit)
        self.pause()                # nothing the fuzzer queues may run
        path = self.daemon.socket
        conns = [FuzzConn(path) for _ in range(self.CONNECTIONS)]
        self.addCleanup(lambda: [c.close() for c in conns])
        stats = {"too_large": 0, "ok": 0, "errors": 0}
        index = 0
        start = time.monotonic()

        def where(i, line, reply=None, problem=""):
            return ("fuzz seed %d, line index %d: %s\n  line:  %r%s\n  reply: %r\n  daemon: %s"
                    % (seed, i, problem, line[:300], "..." if len(line) > 300 else "",
                       (reply or b"")[:300], "running" if self.daemon.proc.poll() is None
                       else "EXITED %s; stderr tail: %s" % (self.daemon.proc.returncode,
                                                            self.daemon.read_stderr()[-1500:])))

        while index < n_lines:
            rounds, chunks = [], []
            for ci in rng.sample(range(len(conns)), rng.randint(1, len(conns))):
                chunk = []
                size = rng.choice([1, 2, 5, 20, 50, 100, 150])
                while len(chunk) < size and index < n_lines:
                    line, expect = maker.next()
                    chunk.append((index, line, expect))
                    index += 1
                    if len(line) > limit:
                        break               # its reply is the connection's last
                if not chunk:
                    break
                payload = b"".join(line + b"\n" for _, line, _ in chunk)
                rounds.append((conns[ci], payload, len(chunk)))
                chunks.append((ci, chunk))
            results = exchange(rounds)
            unanswered = sorted(entry for (ci, chunk), (replies, _) in zip(chunks, results)
                                for entry in chunk[len(replies):])
            if unanswered:
                try:                        # a closed connection: is the daemon going down?
                    self.daemon.proc.wait(2)
                except subprocess.TimeoutExpired:
                    pass
                else:
                    self.fail(self.culprit(seed, unanswered, where))
            for (ci, chunk), (replies, closed) in zip(chunks, results):
                for (i, line, expect), reply in zip(chunk, replies):
                    problem = reply_problem(reply, expect)
                    if problem:
                        self.fail(where(i, line, reply, problem))
                    if b'"ok":true' in reply.replace(b" ", b""):
                        stats["ok"] += 1
                    else:
                        stats["errors"] += 1
                if len(replies) < len(chunk):
                    i, line, _ = chunk[len(replies)]
                    self.fail(where(i, line, None, "the connection was closed before this line "
                                    "was answered" if closed else "no reply within 15 s"))
                last_i, last_line, last_expect = chunk[-1]
                if len(last_line) > limit:
                    stats["too_large"] += 1
                    rest = b"" if closed else read_to_eof(conns[ci].sock)
                    if rest:
                        self.fail(where(last_i, last_line, rest, "more after too_large"))
                    conns[ci].close()
                    conns[ci] = FuzzConn(path)
                elif closed:
                    self.fail(where(last_i, last_line, None, "the daemon closed the connection"))
            self.assertAlive()
        took = time.monotonic() - start
        print("\nfuzz: %d lines (seed %d) in %.1fs: %d ok, %d errors, %d too_large reconnects"
              % (index, seed, took, stats["ok"], stats["errors"], stats["too_large"]),
              file=sys.stderr)
        for conn in conns:
            conn.close()
        # handle_line turns an internal error into a reply; the daemon prints its traceback
        stderr = self.daemon.read_stderr()
        if "Traceback" in stderr:
            first = stderr[stderr.index("Traceback"):]
            self.fail("an internal error while fuzzing (seed %d); the daemon's stderr from the "
                      "first traceback on:\n%s" % (seed, "\n".join(
                          line[:200] for line in first.splitlines()[:30])))
        self.check_after_fuzz()

    def culprit(self, seed, unanswered, where):
        """The daemon died with `unanswered` lines in flight (replies go out at the end of a
        loop pass, so the line that killed it is any of them): restart it on the same state and
        replay them one at a time until one kills it again."""
        first = where(unanswered[0][0], unanswered[0][1], None, "the daemon died")
        self.daemon.stderr.close()
        self.daemon.start()
        for i, line, _ in unanswered[:500]:
            if len(line) > self.daemon.config["max_request_bytes"]:
                continue                    # too_large and a close: expected
            with self.daemon.raw(timeout=10) as c:
                try:
                    c.send_line(line + b"\n")
                    reply = c.file.readline()
                except OSError:
                    reply = b""
            if not reply:
                try:
                    self.daemon.proc.wait(10)
                except subprocess.TimeoutExpired:
                    return where(i, line, reply, "replayed alone after a restart: no reply, "
                                 "the connection closed, the daemon still running")
            if self.daemon.proc.poll() is not None:
                return where(i, line, reply, "the daemon died on this line (replayed alone "
                             "after a restart)")
        return first + "\n  (replaying the %d unanswered lines one by one did not kill it " \
            "again)" % len(unanswered)

    def check_after_fuzz(self):
        """Alive, paused, the state restarts as it was, and then it runs jobs again."""
        self.assertAlive()
        stats = self.assertOk(self.daemon.call(op="stats"))
        self.assertIs(stats["paused"], True, "the fuzzer never sends a valid resume")
        self.assertEqual(stats["counts"]["running"], 0)
        for line in self.read_log("background_jobs.log").split("\n")[:-1]:
            self.assertRegex(line, LOG_LINE_RE)
            parse_log_line(line)
        self.assertEqual(self.daemon.stop(), 0, self.daemon.read_stderr()[-2000:])
        self.daemon.start()
        again = self.assertOk(self.daemon.call(op="stats"))
        self.assertEqual(again["counts"], stats["counts"])
        self.assertIs(again["paused"], True)
        # what the fuzzer left pending is cancelled, so resume runs nothing of it
        with self.daemon.raw(timeout=30) as c:
            while True:
                ids = [j["id"] for j in self.assertOk(
                    c.call(op="list", state="pending", limit=1000))["jobs"]]
                if not ids:
                    break
                c.send_line(b"".join(b'{"op": "cancel", "id": %d}\n' % i for i in ids))
                for _ in ids:
                    self.assertOk(c.recv())
            self.assertEqual(c.call(op="resume"), {"ok": True, "paused": False})
            self.assertOk(c.call(op="hello"))
            self.assertIs(self.assertOk(c.call(op="stats"))["paused"], False)
        self.assertEqual(self.wait_done(self.daemon.add(T, args=["after"]))["state"], "succeeded")


####################################################################################################
#  Many connections, stalled and greedy clients, garbage, oversize lines
####################################################################################################

class ConnectionsTest(HardeningCase):
    # max_connections: the default, 256

    def test_300_connections_at_once(self):
        good = self.daemon.raw(timeout=30)
        self.addCleanup(good.close)
        self.assertOk(good.call(op="hello"))
        socks = []
        self.addCleanup(lambda: [s.close() for s in socks])
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(self.daemon.socket)
            socks.append(s)
        # all 300 open: the good client is still served
        self.assertRoundTripsFast(good, "an existing client while 300 more are open")
        # the daemon has 256 places and the good client holds one: 45 are refused
        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_READ, s)

        def readable():
            return {key.data for key, _ in sel.select(0)}
        refused = wait_until(lambda: len(readable()) >= 45 and readable(), 20,
                             message="45 connections to be refused")
        sel.close()
        for s in refused:
            data = read_to_eof(s)
            lines = data.splitlines()
            self.assertEqual(len(lines), 1, "one busy line, then closed: %r" % data[:300])
            self.assertError(json.loads(lines[0]), "busy")
        accepted = [s for s in socks if s not in refused]
        self.assertEqual(len(accepted), 255)
        # every accepted connection is served (pipelined: all requests, then all replies)
        for s in accepted:
            s.sendall(b'{"op": "hello"}\n')
        for s in accepted:
            reply = s.makefile("rb").readline()
            self.assertOk(json.loads(reply))
        self.assertRoundTripsFast(good, "an existing client after the refusals")
        # close 100: fresh connections are accepted again, and answered at once
        for s in accepted[:100]:
            s.close()
        self.assertOk(good.call(op="hello"))
        times = []
        for _ in range(5):
            def fresh():
                with self.daemon.raw(timeout=10) as c:
                    return c.call(op="hello")
            took, reply = timed(fresh)
            self.assertOk(reply, "a fresh connection after closing 100: %r" % reply)
            times.append(took)
        self.assertLess(statistics.median(times), LATENCY_BOUND, times)
        self.assertAlive()


class StalledClientTest(HardeningCase):

    def test_half_a_line_then_silence_blocks_nobody(self):
        staller = self.daemon.raw(timeout=30)
        self.addCleanup(staller.close)
        silent = self.daemon.raw(timeout=30)           # connects and never sends a byte
        self.addCleanup(silent.close)
        staller.send_line(b'{"op": "hel')
        slow = self.daemon.raw(timeout=30)              # a request one byte at a time
        self.addCleanup(slow.close)
        slow.send_line(b'{"op": "st')
        with self.daemon.raw(timeout=30) as good:
            self.assertRoundTripsFast(good, "beside a stalled client")
            job_id = self.assertOk(good.call(op="add", target=T))["id"]
            self.assertEqual(self.wait_done(job_id)["state"], "succeeded")
            self.assertRoundTripsFast(good, "beside a stalled client", op="get", id=job_id)
            probe = LatencyProbe(self.daemon.socket)
            for byte in b'ats"}\n':
                slow.send_line(bytes([byte]))
                self.assertOk(good.call(op="hello"))    # a round trip between the bytes
            self.assertProbeFast(probe, "beside a client sending byte by byte")
        self.assertEqual(set(slow.recv()), {"ok", "counts", "workers", "paused", "uptime",
                                            "protocol"})
        # the half line was kept, not dropped: finishing it gets its reply
        staller.send_line(b'lo"}\n')
        self.assertEqual(staller.recv()["protocol"], 1)
        self.assertAlive()




class IdleTimeoutTest(HardeningCase):
    """idle_timeout (600 s) shortened to 1 s through the config."""

    config = {"idle_timeout": 1}

    def test_stalled_client_is_hung_up_after_the_idle_timeout(self):
        idle = 1.0
        with self.daemon.raw(timeout=30) as staller, self.daemon.raw() as good:
            start = time.monotonic()    # before the send: its idle time counts from there
            staller.send_line(b'{"op": "hel')
            self.assertOk(good.call(op="hello"))
            data = read_to_eof(staller.sock, timeout=30)
            waited = time.monotonic() - start
            self.assertGreaterEqual(waited, idle * 0.9)
            self.assertLess(waited, idle * 10)
            [line] = data.splitlines()
            self.assertEqual(json.loads(line)["error"]["code"], "bad_request")
            # (on a new connection: `good` has been idle as long, and is hung up too)
            self.assertOk(self.daemon.call(op="hello"), "the daemon serves the others")
        # A pending wait is a request in progress: not hung up. (A connection with none is,
        # since idle_timeout applies to every connection: tests/test_attack_conns.py.)
        start = time.monotonic()        # before the add: the job may start at once
        job_id = self.daemon.add("examples.jobs:DelayedJob", args=[idle * 2.5])
        with self.daemon.raw(timeout=30) as waiting:
            reply = waiting.call(op="wait", id=job_id, timeout=30)
            self.assertGreater(time.monotonic() - start, idle * 2)
            self.assertTrue(reply["done"], reply)
            self.assertEqual(waiting.call(op="hello")["protocol"], 1)


class GarbageTest(HardeningCase):

    def garbage(self, rng, n):
        """n lines and the error code SPEC gives each."""
        lines, codes = [], []
        for i in range(n):
            kind = rng.randrange(6)
            if kind == 0:
                line = b"garbage " + bytes(rng.choice(b"abc{}[]:,\"\\ 019") for _ in range(
                    rng.randint(0, 40)))
                code = "bad_request"
            elif kind == 1:
                line = bytes(rng.choice([0, 1, 0x1b, 0x7f, 0x80, 0xc0, 0xff, 0x41, 0x7b])
                             for _ in range(rng.randint(1, 40)))
                code = "bad_request"
            elif kind == 2:
                line = b'{"op": "nope-%d"}' % i
                code = "unknown_op"
            elif kind == 3:
                line = b'{"op": "get", "id": %d}' % (1000000 + i)
                code = "not_found"
            elif kind == 4:
                line = b'{"op": "add", "target": "os:system", "args": ["rm -rf /tmp/%d"]}' % i
                code = "not_allowed"
            else:
                line = rng.choice([b"[1, 2]", b"null", b"", b"{", b'{"op": "add"}', b"\x00"])
                code = "bad_request"
            lines.append(line.replace(b"\n", b""))
            codes.append(code)
        return lines, codes

    def test_5000_lines_of_garbage_beside_a_normal_client(self):
        rng = random.Random(FUZZ_SEED)
        lines, codes = self.garbage(rng, 5000)
        payload = b"".join(line + b"\n" for line in lines)
        flood = self.daemon.raw(timeout=60)
        self.addCleanup(flood.close)
        probe = LatencyProbe(self.daemon.socket)
        sender_errors = []

        def send():
            try:
                flood.send_line(payload)            # one write of every line
            except OSError as exc:
                sender_errors.append(exc)
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        times = {"hello": [], "add": [], "wait": []}
        with self.daemon.raw(timeout=60) as c:
            for i in range(5):
                took, reply = timed(lambda: c.call(op="hello"))
                times["hello"].append(took)
                took, reply = timed(lambda: c.call(op="add", target=T, args=[i]))
                times["add"].append(took)
                self.assertOk(reply)
                took, done = timed(lambda: c.call(op="wait", id=reply["id"], timeout=30))
                times["wait"].append(took)
                self.assertEqual(done["job"]["state"], "succeeded", done)
        for op, values in times.items():
            # A wait's time also runs its job end to end (a fork, an import): more room.
            bound = LATENCY_BOUND if op != "wait" else LATENCY_BOUND + 4.0
            self.assertLess(statistics.median(values), bound,
                            "%s beside 5,000 garbage lines: %s" % (op, values))
        replies = [flood.recv() for _ in lines]
        sender.join(30)
        self.assertFalse(sender_errors)
        self.assertProbeFast(probe, "beside 5,000 pipelined garbage lines")
        got = []
        for line, reply in zip(lines, replies):
            self.assertIs(reply.get("ok"), False, (line, reply))
            self.assertIsInstance(reply["error"]["message"], str)
            got.append(reply["error"]["code"])
        first = next((i for i, (a, b) in enumerate(zip(got, codes)) if a != b), None)
        self.assertIsNone(first, "reply %s is %s, expected %s (line %r): out of order?"
                          % (first, got[first] if first is not None else None,
                             codes[first] if first is not None else None,
                             lines[first] if first is not None else None))
        self.assertOk(flood.call(op="hello"))           # still open, still in order
        counts = self.assertOk(self.daemon.call(op="stats"))["counts"]
        self.assertEqual(sum(counts.values()), 5, counts)   # the garbage added nothing


class NonReaderTest(HardeningCase):
    REQUESTS = 1000

    def test_client_that_never_reads_its_replies(self):
        self.pause()
        reply = self.daemon.call(op="add_batch", jobs=[{"target": T, "args": ["x" * 20]}] * 1000)
        self.assertEqual(len(self.assertOk(reply)["ids"]), 1000)
        pid = self.daemon.proc.pid
        self.assertEqual(len(self.daemon.call(op="list", limit=1000)["jobs"]), 1000)
        before = vm_rss_mb(pid)
        hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(hog.close)
        hog.connect(self.daemon.socket)
        hog.settimeout(0)
        request = b'{"op": "list", "limit": 1000}\n'
        pending = memoryview(request * self.REQUESTS)
        probe = LatencyProbe(self.daemon.socket)
        # Write what the socket takes, never read. Each reply is ~400 KB: the replies to the
        # whole burst would be ~400 MB. Give up writing when the daemon has stopped taking more.
        stuck_since = None
        deadline = time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            try:
                pending = pending[hog.send(pending):]
                stuck_since = None
            except BlockingIOError:
                stuck_since = stuck_since or time.monotonic()
                if time.monotonic() - stuck_since > 2:
                    break
                select_w = selectors.DefaultSelector()
                select_w.register(hog, selectors.EVENT_WRITE)
                select_w.select(0.1)
                select_w.close()
        with self.daemon.raw(timeout=120) as other:
            with self.subTest("round trips on another connection"):
                self.assertRoundTripsFast(other, "beside a client that never reads", op="get",
                                          id=1)
        with self.subTest("latency"):
            self.assertProbeFast(probe, "beside a client that never reads its replies")
        after = vm_rss_mb(pid)
        with self.subTest("memory"):
            self.assertLess(after - before, 200, "daemon RSS grew from %.0f MB to %.0f MB while "
                            "one client did not read its replies" % (before, after))
        hog.close()
        self.assertOk(self.daemon.call(op="hello"))
        self.assertAlive()


class OversizeTest(HardeningCase):
    # SPEC: "A request line longer than max_request_bytes gets too_large"; bytes of the line,
    # the "\n" that ends it is framing.
    config = {"max_request_bytes": 4096}

    def line_of(self, size):
        """An add line of exactly `size` bytes, padded with 2-byte characters (bytes != chars)."""
        head = b'{"op": "add", "target": "examples.jobs:echo", "args": ["'
        tail = b'"]}'
        room = size - len(head) - len(tail)
        self.pad = "é" * (room // 2) + "x" * (room % 2)
        line = head + self.pad.encode() + tail
        self.assertEqual(len(line), size)
        return line

    def test_exactly_the_limit_works_one_byte_more_is_too_large(self):
        self.pause()
        with self.daemon.raw(timeout=30) as good:
            probe = LatencyProbe(self.daemon.socket)
            with self.daemon.raw(timeout=10) as c:
                at = self.line_of(4096)
                pad = self.pad
                c.send_line(at + b"\n")
                self.assertEqual(self.assertOk(c.recv())["id"], 1)
                # the same line in two writes, with a round trip elsewhere between them
                c.send_line(at[:3000])
                self.assertOk(good.call(op="hello"))
                c.send_line(at[3000:] + b"\n")
                self.assertEqual(self.assertOk(c.recv())["id"], 2)
                # 4,097 bytes but fewer characters
                over = self.line_of(4097)
                self.assertLess(len(over.decode()), 4096)
                try:
                    c.send_line(over + b'\n{"op": "hello"}\n')
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.assertError(c.recv(), "too_large")
                self.assertEqual(read_to_eof(c.sock), b"", "closed after too_large")
            self.assertRoundTripsFast(good, "after another client's oversize line")
            self.assertProbeFast(probe, "while another client sent an oversize line")
        self.assertEqual(self.daemon.get(1)["args"], [pad])
        self.assertEqual([j["id"] for j in self.daemon.call(op="list")["jobs"]], [1, 2])


####################################################################################################
#  The socket and the peer
####################################################################################################

class SocketTest(HardeningCase):

    def prepare(self):
        # a socket in a directory the daemon has to make
        self.daemon.socket = self.path("run", "sub", "jobrunnerd.sock")
        self.daemon.config["socket"] = self.daemon.socket

    def test_socket_mode_and_its_directory(self):
        import stat
        st = os.lstat(self.daemon.socket)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)     # socket_mode's default
        parent = os.path.dirname(self.daemon.socket)
        mode = stat.S_IMODE(os.stat(parent).st_mode)
        self.assertEqual(mode & 0o027, 0, "%s is %o: made 0700 or 0750" % (parent, mode))

    def test_a_path_that_is_not_a_socket_is_never_replaced(self):
        self.assertEqual(self.daemon.stop(), 0)
        with open(self.daemon.socket, "w") as f:
            f.write("precious")
        self.daemon.start(wait=False)
        code = self.daemon.proc.wait(30)
        self.daemon.stderr.close()
        self.assertNotEqual(code, 0)
        self.assertIn(self.daemon.socket, self.daemon.read_stderr())
        with open(self.daemon.socket) as f:
            self.assertEqual(f.read(), "precious")

    def test_queued_line_names_the_peer_uid(self):
        job_id = self.daemon.add(T)
        queued = wait_until(lambda: self.daemon.job_events(job_id, "queued"), message="queued line")
        self.assertEqual(queued[0].get("uid"), str(os.getuid()), queued[0])

    def test_targets_with_path_separators_are_bad_requests(self):
        # each matches the allow pattern examples.*:* (fnmatch's * crosses "/"): syntax decides
        for target in ("examples.jobs/../../etc:X", "examples.x/y:Z", "examples.jobs:Example/Job",
                       "examples.jobs\\x:Y", "examples..jobs:ExampleJob", "examples.jobs:X ",
                       "examples.jobs:X\x00", "examples.jobs:X:Y", "examples.jobs:X.",
                       "examples.jobs:1X", "examples.jobs:X-Y"):
            self.assertError(self.daemon.call(op="add", target=target), "bad_request", target)
        self.assertEqual(self.daemon.call(op="list")["jobs"], [])


####################################################################################################
#  The allow list, again in the child
####################################################################################################

class AllowReloadTest(HardeningCase):
    config = {"allow": ALLOW}

    def test_sighup_removing_a_pattern_stops_queued_jobs(self):
        marker = self.path("imported")
        self.write_job_module("testjobs_x", "open(%r, 'w').close()\n\ndef f():\n    return 1\n"
                              % marker)
        self.pause()
        victim = self.daemon.add("testjobs_x:f", delay=0.5, retries=3, retry_delay=0.01,
                                 backoff="fixed")
        self.daemon.config["allow"] = ["examples.*:*"]
        self.daemon.write_config()
        self.daemon.proc.send_signal(signal.SIGHUP)

        def refused():
            reply = self.daemon.call(op="add", target="testjobs_x:f", delay=3600)
            if reply["ok"]:                     # not reloaded yet: take it back
                self.assertOk(self.daemon.call(op="cancel", id=reply["id"]))
                return False
            self.assertError(reply, "not_allowed")
            return True
        wait_until(refused, 15, message="the reloaded allow list to refuse testjobs_x:f")
        self.assertEqual(self.daemon.get(victim)["state"], "pending")
        self.assertOk(self.daemon.call(op="resume"))
        job = self.wait_done(victim)
        self.assertEqual((job["state"], job["attempts"]), ("failed", 1), job)
        self.assertIn("not allowed", job["error"].lower())
        self.assertFalse(os.path.exists(marker), "the job's module was imported")
        wait_until(lambda: self.daemon.job_events(victim, "failed"), message="the failed line")
        self.assertEqual(len(self.daemon.job_events(victim, "started")), 1)
        self.assertEqual(self.daemon.job_events(victim, "retrying"), [])
        failed = self.daemon.job_events(victim, "failed")[0]
        self.assertIn("not allowed", failed.get("error", "").lower())
        # what is still allowed still runs
        self.assertEqual(self.wait_done(self.daemon.add(T))["state"], "succeeded")


####################################################################################################
#  Job processes: resource limits, isolation from PYTHON*, logs they cannot forge
####################################################################################################

class ForgedReportTest(HardeningCase):
    """Job code can write anything to fd 3, where the child reports its result. What the
    journal could not hold (nesting past the limit, a lone surrogate) must not crash the
    daemon: the attempt counts as one that gave no report."""
    config = {"allow": ALLOW}

    def test_reports_the_journal_could_not_hold_do_not_crash_the_daemon(self):
        self.write_job_module("testjobs_forge", "import os\n\n"
                              "def deep():\n"
                              "    os.write(3, b'{\"status\": \"ok\", \"result\": '"
                              " + b'[' * 5000 + b']' * 5000 + b'}\\n')\n"
                              "    os._exit(0)\n\n"
                              "def surrogate():\n"
                              "    os.write(3, b'{\"status\": \"ok\", \"result\": \"\\\\ud800\"}\\n')\n"
                              "    os._exit(0)\n")
        for target in ("testjobs_forge:deep", "testjobs_forge:surrogate"):
            with self.subTest(target=target):
                job = self.wait_done(self.daemon.add(target))
                self.assertIsNone(job["result"], job)
                self.assertEqual(self.daemon.call(op="hello")["ok"], True)
                self.assertIsNone(self.daemon.proc.poll(), "the daemon died")
        self.daemon.stop()                      # and it comes back with that state
        self.daemon.start()
        self.assertEqual(self.daemon.call(op="stats")["ok"], True)


class LimitsTest(HardeningCase):
    MEMORY = 512 * 1024 * 1024
    config = {"allow": ALLOW, "workers": 2,
              "limits": {"cpu": 1, "memory": MEMORY, "nofile": 64, "fsize": 1048576}}

    def setUp(self):
        super().setUp()
        self.write_job_module("testjobs_hard", JOB_MODULE)

    def run_job(self, target, *args, **fields):
        return self.wait_done(self.daemon.add(target, args=list(args), **fields))

    def test_the_limits_and_no_core_dumps_in_the_job(self):
        job = self.run_job("testjobs_hard:limits")
        self.assertEqual(job["state"], "succeeded", job["error"])
        self.assertEqual(job["result"], {
            "RLIMIT_CORE": [0, 0], "RLIMIT_CPU": [1, 1], "RLIMIT_AS": [self.MEMORY] * 2,
            "RLIMIT_NOFILE": [64, 64], "RLIMIT_FSIZE": [1048576, 1048576]})

    def test_cpu(self):
        job = self.run_job("testjobs_hard:burn", timeout=30)
        self.assertEqual(job["state"], "failed")
        self.assertNotRegex(job["error"].lower(), r"time(d)?[ _-]?out", job)
        self.assertTrue(job["exit_code"] in (-signal.SIGXCPU, -signal.SIGKILL)
                        or "signal" in job["error"].lower(), job)
        self.assertLess(job["finished_at"] - job["started_at"], 20, job)

    def test_nofile(self):
        os.makedirs(self.path("files"))
        job = self.run_job("testjobs_hard:open_files", self.path("files"), 100)
        self.assertEqual(job["state"], "failed")
        self.assertIn("OSError", job["error"])
        self.assertIn("[Errno %d]" % errno.EMFILE, job["error"])

    def test_fsize(self):
        target = self.path("big")
        job = self.run_job("testjobs_hard:write_bytes", target, 2 * 1024 * 1024)
        self.assertEqual(job["state"], "failed")
        self.assertTrue(job["exit_code"] == -signal.SIGXFSZ
                        or "[Errno %d]" % errno.EFBIG in job["error"], job)
        self.assertLessEqual(os.path.getsize(target), 1048576)

    def test_memory(self):
        job = self.run_job("testjobs_hard:allocate", 2 * 1024 ** 3)
        self.assertEqual(job["state"], "failed")
        self.assertIn("MemoryError", job["error"])


class IsolationTest(HardeningCase):
    config = {"allow": ALLOW}

    def test_python_variables_do_not_reach_the_job_interpreter(self):
        self.write_job_module("testjobs_hard", JOB_MODULE)
        pythonpath = self.path("pythonpath")
        os.makedirs(pythonpath)
        with open(os.path.join(pythonpath, "jr_pythonpath_probe.py"), "w") as f:
            f.write("VALUE = 1\n")
        with open(os.path.join(pythonpath, "sitecustomize.py"), "w") as f:
            f.write("# would be imported by an interpreter that honours PYTHONPATH\n")
        startup_marker = self.path("startup-ran")
        with open(self.path("startup.py"), "w") as f:
            f.write("open(%r, 'w').close()\n" % startup_marker)
        self.assertEqual(self.daemon.stop(), 0)
        self.daemon.start(env=daemon_env(PYTHONPATH=pythonpath,
                                         PYTHONSTARTUP=self.path("startup.py"), PYTHONINSPECT="1",
                                         WATCHDOG_USEC="60000000"))
        job = self.wait_done(self.daemon.add("testjobs_hard:isolation",
                                             args=["jr_pythonpath_probe"]))
        self.assertEqual(job["state"], "succeeded", job["error"])
        r = job["result"]
        self.assertEqual((r["isolated"], r["ignore_environment"], r["no_user_site"],
                          r["inspect"]), (1, 1, 1, 0), r)
        self.assertFalse([p for p in r["path"] if p.startswith(pythonpath)], r["path"])
        self.assertIs(r["probe_found"], False)
        self.assertFalse((r["sitecustomize"] or "").startswith(pythonpath), r["sitecustomize"])
        self.assertEqual(r["watchdog"], [])
        self.assertEqual(r["core"], [0, 0])             # no limits configured: still no cores
        self.assertFalse(os.path.exists(startup_marker))


class LogInjectionTest(HardeningCase):
    config = {"allow": ALLOW}
    FORGED = "2026-11-28T00:00:00.000Z event=succeeded job=999 target=x:y"

    def test_forged_exception_name_and_100kb_message(self):
        self.write_job_module("testjobs_hard", JOB_MODULE)
        separators = ["\n", "\r", "\r\n", "\x85", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c",
                      "\x1d", "\x1e", "\x00"]
        message = "boom" + "".join(sep + self.FORGED for sep in separators) \
            + " " + "A" * 100000 + "\n" + self.FORGED
        name = "Forged\n" + self.FORGED + "\rX"
        job_id = self.daemon.add("testjobs_hard:forge", args=[name, message])
        job = self.wait_done(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("failed", 1))
        self.assertEqual(len(job["error"].splitlines()), 1, job["error"][:300])
        wait_until(lambda: self.daemon.job_events(job_id, "failed"), message="the failed line")
        events = self.read_log("background_jobs.log")
        self.assertEqual(events.splitlines(), events.split("\n")[:-1])
        for line in events.split("\n")[:-1]:
            self.assertRegex(line, LOG_LINE_RE)
            self.assertLess(len(line.encode()), 10 * 1024, "a log line of %d bytes"
                            % len(line.encode()))
            self.assertNotEqual(parse_log_line(line).get("job"), "999", line[:300])
        failed = self.daemon.job_events(job_id, "failed")[0]
        self.assertIn("boom", failed.get("error", ""))
        self.assertIn("event=succeeded job=999", failed["error"])   # kept, as a value
        errors = self.read_log("background_jobs_errors.log")
        self.assertEqual(errors.splitlines(), errors.split("\n")[:-1])
        headers = []
        for line in errors.split("\n")[:-1]:
            if line[:1].isdigit():
                # only a header may start with a digit: anything else is a forgery
                self.assertRegex(line, LOG_LINE_RE)
                headers.append(parse_log_line(line))
            else:
                self.assertRegex(line, r"^\s", "a continuation line must start with whitespace")
        self.assertEqual([(h["event"], h["job"]) for h in headers], [("failed", str(job_id))])
        self.assertIn(self.FORGED, errors)          # the detail is there, indented
        self.assertIn("A" * 1000, errors)


if __name__ == "__main__":
    unittest.main()
