"""End-to-end protocol tests: a real jobrunnerd per test, driven only through its socket.

Each test reads like a transcript of SPEC §3: request lines go out, reply lines come back, and
the assertions name the fields SPEC fixes. Jobs are the examples (examples/jobs.py) plus a small
module written into each test's own job path (JOB_MODULE). Nothing here sleeps a fixed time:
it polls with a deadline (`wait_until`) or lets the daemon block (`wait`).

Classes are grouped by the daemon config they need; DaemonTestCase starts a fresh daemon for
every test, so no test sees another's jobs.
"""
import datetime
import json
import os
import pwd
import re
import select
import signal
import socket
import time
import unittest

from tests import support
from tests.support import DaemonTestCase, daemon_env, wait_until

ALLOW = ["examples.*:*", "testjobs*:*"]
T = "examples.jobs:ExampleJob"

JOB_FIELDS = {
    "id", "target", "method", "args", "kwargs", "priority", "state", "attempts", "retries",
    "retry_delay", "backoff", "timeout", "key", "queue", "after", "on_parent_failure",
    "schedule", "created_at", "run_at", "started_at", "finished_at", "pid", "exit_code", "error",
    "result",
}
STATES = ("blocked", "pending", "running", "succeeded", "failed", "cancelled")
LOG_TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
LOG_LINE_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z event=[a-z_]+( |\n|\Z)")
LOG_EVENTS = {"queued", "blocked", "unblocked", "started", "succeeded", "retrying", "failed", "cancelled", "timed_out",
              "interrupted", "startup", "shutdown"}

# Written as jobs/testjobs_e2e.py in every test's job path.
JOB_MODULE = r'''
import os, signal, sys, time

def wait_for(path, seconds=60):
    """Block until `path` exists: the test decides when this job may finish."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError("never released: " + path)
        time.sleep(0.01)
    return "released"

def print_then_wait(first, path, second):
    sys.stdout.buffer.write(first.encode("utf-8"))
    sys.stdout.flush()
    wait_for(path)
    sys.stdout.buffer.write(second.encode("utf-8"))
    sys.stdout.flush()
    return len(first) + len(second)

def stubborn(seconds=60):
    """Ignores SIGTERM: only the SIGKILL after kill_grace ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    time.sleep(seconds)

def fail_with(message):
    raise ValueError(message)

def value(v):
    return v

def sized(n):
    return "x" * n

def a_set():
    return {1, 2}

def nan():
    return float("nan")

def an_object():
    return object()
'''


####################################################################################################
#  Helpers
####################################################################################################

def log_ts(text):
    """'2026-11-28T16:00:00.123Z' -> epoch seconds."""
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def _proc_stat(pid):
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()     # [0] state, [1] ppid, [2] pgrp


def process_gone(pid):
    """True when `pid` no longer runs. A zombie counts as gone: it is dead, and a reparented
    one may wait for an init that never reaps (as in some containers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return _proc_stat(pid)[0] == "Z"
    except (OSError, ValueError, IndexError):
        return True


def group_gone(pgid):
    """True when no live (non-zombie) process is left in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = _proc_stat(int(entry))
            except (OSError, ValueError, IndexError):
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":
                return False
    return True


class ProtocolTestCase(DaemonTestCase):
    """DaemonTestCase plus the job module and assertions on reply shapes."""

    config = {"allow": ALLOW, "kill_grace": 0.5}

    def setUp(self):
        super().setUp()
        self.write_job_module("testjobs_e2e", JOB_MODULE)

    # -- replies ---------------------------------------------------------------------------

    def call(self, **req):
        return self.daemon.call(**req)

    def assertOk(self, reply, *fields):
        """`reply` is ok and has exactly `fields` besides "ok" (SPEC §3 table)."""
        self.assertIs(reply.get("ok"), True, reply)
        self.assertEqual(set(reply), {"ok", *fields}, reply)
        return reply

    def assertError(self, reply, code, msg=None):
        """`reply` is {"ok": false, "error": {"code": code, "message": TEXT}}."""
        self.assertIs(reply.get("ok"), False, msg or reply)
        self.assertEqual(set(reply), {"ok", "error"}, msg or reply)
        self.assertEqual(set(reply["error"]), {"code", "message"}, msg or reply)
        self.assertEqual(reply["error"]["code"], code, msg or reply)
        self.assertIsInstance(reply["error"]["message"], str)
        self.assertTrue(reply["error"]["message"], reply)
        return reply

    def add(self, target=T, **fields):
        reply = self.assertOk(self.call(op="add", target=target, **fields), "id", "created")
        self.assertIs(reply["created"], True, reply)
        return reply["id"]

    def get(self, job_id):
        return self.assertOk(self.call(op="get", id=job_id), "job")["job"]

    def wait_done(self, job_id, timeout=30.0):
        reply = self.assertOk(self.call(op="wait", id=job_id, timeout=timeout), "job", "done")
        self.assertIs(reply["done"], True, reply)
        return reply["job"]

    def counts(self):
        return self.assertOk(self.call(op="stats"), "counts", "workers", "paused", "uptime",
                             "protocol")["counts"]

    def all_ids(self):
        return [j["id"] for j in self.call(op="list", limit=1000)["jobs"]]

    def pause(self):
        self.assertOk(self.call(op="pause"), "paused")

    def resume(self):
        self.assertOk(self.call(op="resume"), "paused")

    def path(self, name):
        return os.path.join(self.root, name)

    def wait_events(self, job_id, event, n=1, timeout=10.0):
        return wait_until(lambda: len(self.daemon.job_events(job_id, event)) >= n
                          and self.daemon.job_events(job_id, event), timeout,
                          message="%d %s line(s) for job %s" % (n, event, job_id))

    def output_text(self, job_id, raw=False):
        """The job's own output (raw: with the daemon's attempt lines, as `output` has it)."""
        data = self.call(op="output", id=job_id, offset=0, limit=1 << 20)["data"]
        return data if raw else support.job_output(data)

    def read_output(self, job_id, limit, offset=0):
        """Page through a job's output with `limit`; the replies, until eof or no progress."""
        replies = []
        for _ in range(100000):
            reply = self.assertOk(self.call(op="output", id=job_id, offset=offset, limit=limit),
                                  "data", "offset", "eof")
            replies.append(reply)
            if reply["eof"] or reply["offset"] == offset:
                return replies
            self.assertGreater(reply["offset"], offset)
            offset = reply["offset"]
        self.fail("output paging did not end")


####################################################################################################
#  Every op and its reply fields
####################################################################################################

class OpsTest(ProtocolTestCase):

    def test_hello(self):
        reply = self.assertOk(self.call(op="hello"), "protocol", "version")
        self.assertEqual(reply["protocol"], 1)
        self.assertIsInstance(reply["version"], str)
        self.assertTrue(reply["version"])

    def test_add_get_record_fields(self):
        self.pause()
        before = time.time()
        reply = self.assertOk(self.call(op="add", target=T, args=["a", "b"], priority=3,
                                        retries=2, retry_delay=0.5, backoff="fixed",
                                        timeout=30, key="k1"), "id", "created")
        self.assertEqual(reply, {"ok": True, "id": 1, "created": True})   # ids start at 1
        job = self.get(1)
        self.assertEqual(set(job), JOB_FIELDS)
        self.assertEqual(job["id"], 1)
        self.assertEqual(job["target"], T)
        self.assertIsNone(job["method"])
        self.assertEqual(job["args"], ["a", "b"])
        self.assertEqual(job["kwargs"], {})
        self.assertEqual(job["priority"], 3)
        self.assertEqual(job["state"], "pending")
        self.assertEqual(job["attempts"], 0)
        self.assertEqual(job["retries"], 2)
        self.assertEqual(job["retry_delay"], 0.5)
        self.assertEqual(job["backoff"], "fixed")
        self.assertEqual(job["timeout"], 30)
        self.assertEqual(job["key"], "k1")
        self.assertGreaterEqual(job["created_at"], before - 1)
        self.assertLessEqual(job["created_at"], time.time() + 1)
        self.assertAlmostEqual(job["run_at"], job["created_at"], delta=0.05)
        for name in ("started_at", "finished_at", "pid", "exit_code", "error", "result"):
            self.assertIsNone(job[name], name)
        self.resume()
        job = self.wait_done(1)
        self.assertEqual(job["state"], "succeeded")
        self.assertEqual(job["attempts"], 1)
        self.assertEqual(job["exit_code"], 0)
        self.assertEqual(job["result"], {"params": ["a", "b"]})
        self.assertIsNone(job["pid"])
        self.assertIsNone(job["error"])
        self.assertGreaterEqual(job["started_at"], job["created_at"])
        self.assertGreaterEqual(job["finished_at"], job["started_at"])

    def test_add_defaults_and_explicit_null_timeout(self):
        self.pause()
        job = self.get(self.add())
        self.assertEqual((job["method"], job["args"], job["kwargs"], job["priority"]),
                         (None, [], {}, 0))
        # SPEC §5 defaults: retries 0, retry_delay 1.0, backoff exponential, timeout 3600
        self.assertEqual((job["retries"], job["retry_delay"], job["backoff"], job["timeout"]),
                         (0, 1.0, "exponential", 3600))
        self.assertIsNone(job["key"])
        job = self.get(self.add(timeout=None, method="handle"))
        self.assertIsNone(job["timeout"])
        self.assertEqual(job["method"], "handle")

    def test_add_batch(self):
        self.pause()
        reply = self.assertOk(self.call(op="add_batch", jobs=[
            {"target": T, "args": ["one"]},
            {"target": "examples.jobs:echo", "kwargs": {"k": 2}, "priority": 4},
            {"target": T, "key": "batch-key"},
        ]), "ids")
        self.assertEqual(reply["ids"], [1, 2, 3])
        jobs = [self.get(i) for i in reply["ids"]]
        self.assertEqual([j["target"] for j in jobs], [T, "examples.jobs:echo", T])
        self.assertEqual(jobs[0]["args"], ["one"])
        self.assertEqual(jobs[1]["kwargs"], {"k": 2})
        self.assertEqual(jobs[1]["priority"], 4)
        self.assertEqual(jobs[2]["key"], "batch-key")
        self.assertEqual(self.counts()["pending"], 3)

    def test_list_filters_limit_and_after_id(self):
        self.pause()
        echo = "examples.jobs:echo"
        for target in (T, echo, T, echo, T):
            self.add(target)
        self.assertOk(self.call(op="cancel", id=2), "job")
        reply = self.assertOk(self.call(op="list"), "jobs", "more", "total")
        self.assertEqual([j["id"] for j in reply["jobs"]], [1, 2, 3, 4, 5])
        self.assertEqual(set(reply["jobs"][0]), JOB_FIELDS)
        ids = lambda **kw: [j["id"] for j in self.call(op="list", **kw)["jobs"]]  # noqa: E731
        self.assertEqual(ids(state="cancelled"), [2])
        self.assertEqual(ids(state="pending"), [1, 3, 4, 5])
        self.assertEqual(ids(state="succeeded"), [])
        self.assertEqual(ids(target=echo), [2, 4])
        self.assertEqual(ids(target="examples.jobs:Ex*"), [1, 3, 5])
        self.assertEqual(ids(target="examples.*", state="pending"), [1, 3, 4, 5])
        self.assertEqual(ids(limit=2), [1, 2])
        self.assertEqual(ids(after_id=2, limit=2), [3, 4])
        self.assertEqual(ids(after_id=5), [])
        # default limit 100, at most 1000
        self.assertOk(self.call(op="add_batch", jobs=[{"target": T}] * 150), "ids")
        self.assertEqual(ids(), list(range(1, 101)))
        self.assertEqual(ids(limit=1000), list(range(1, 156)))

    def test_cancel_pending_job_never_runs(self):
        self.pause()
        victim = self.add()
        reply = self.assertOk(self.call(op="cancel", id=victim), "job")
        job = reply["job"]
        self.assertEqual(set(job), JOB_FIELDS)
        self.assertEqual((job["id"], job["state"], job["attempts"]), (victim, "cancelled", 0))
        self.assertIsNotNone(job["finished_at"])
        self.wait_events(victim, "cancelled")
        self.resume()
        later = self.add()
        self.assertEqual(self.wait_done(later)["state"], "succeeded")
        job = self.get(victim)
        self.assertEqual((job["state"], job["attempts"], job["started_at"]),
                         ("cancelled", 0, None))
        self.assertEqual(self.daemon.job_events(victim, "started"), [])

    def test_retry_failed_job(self):
        job_id = self.add("examples.jobs:ErrorJob")
        job = self.wait_done(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("failed", 1))
        reply = self.assertOk(self.call(op="retry", id=job_id), "job")
        job = reply["job"]
        self.assertEqual(set(job), JOB_FIELDS)
        self.assertIn(job["state"], ("pending", "running"))
        self.assertEqual(job["attempts"], 0)
        self.assertIsNone(job["error"])
        self.assertIsNone(job["finished_at"])
        job = self.wait_done(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("failed", 1))
        self.assertIn("attempt 1", job["error"])
        self.wait_events(job_id, "queued", 2)
        self.wait_events(job_id, "failed", 2)

    def test_wait_timeout_returns_not_done(self):
        self.pause()
        job_id = self.add()
        start = time.monotonic()
        reply = self.assertOk(self.call(op="wait", id=job_id, timeout=0.3), "job", "done")
        self.assertGreaterEqual(time.monotonic() - start, 0.29)
        self.assertIs(reply["done"], False)
        self.assertEqual(reply["job"]["state"], "pending")
        reply = self.assertOk(self.call(op="wait", id=job_id, timeout=0), "job", "done")
        self.assertIs(reply["done"], False)

    def test_wait_without_timeout_and_two_waiters(self):
        release = self.path("release-wait")
        job_id = self.add("testjobs_e2e:wait_for", args=[release])
        with self.daemon.raw(timeout=20) as a, self.daemon.raw(timeout=20) as b:
            a.send(op="wait", id=job_id)
            b.send(op="wait", id=job_id, timeout=60)
            self.assertIs(self.call(op="wait", id=job_id, timeout=0.1)["done"], False)
            open(release, "w").close()
            for conn in (a, b):
                reply = self.assertOk(conn.recv(), "job", "done")
                self.assertIs(reply["done"], True)
                self.assertEqual(reply["job"]["id"], job_id)
                self.assertEqual(reply["job"]["state"], "succeeded")
                self.assertEqual(reply["job"]["result"], "released")
        # a finished job answers at once
        reply = self.assertOk(self.call(op="wait", id=job_id), "job", "done")
        self.assertIs(reply["done"], True)

    def test_output_paging_eof_and_utf8(self):
        first, second = "a€€😀é€x\n", "é😀😀b\n€\U0001F600ü"
        release = self.path("release-output")
        job_id = self.add("testjobs_e2e:print_then_wait", args=[first, release, second])
        # The daemon's header line of the attempt comes first (issue #16), its end line last.
        head = wait_until(lambda: self.output_text(job_id, raw=True).partition("\n")[1] and
                          self.output_text(job_id, raw=True).partition("\n")[0] + "\n")
        first = head + first
        size1 = len(first.encode())
        wait_until(lambda: self.call(op="output", id=job_id, limit=1 << 16)["offset"] >= size1,
                   message="the first output")
        # running: everything so far can be read, but eof stays false
        reply = self.assertOk(self.call(op="output", id=job_id), "data", "offset", "eof")
        self.assertEqual((reply["data"], reply["offset"], reply["eof"]), (first, size1, False))
        reply = self.call(op="output", id=job_id, offset=size1)
        self.assertEqual((reply["data"], reply["offset"], reply["eof"]), ("", size1, False))
        for limit in (1, 2, 3):
            replies = self.read_output(job_id, limit)
            self.assertEqual("".join(r["data"] for r in replies), first, "limit=%d" % limit)
            self.assertFalse(any(r["eof"] for r in replies))
        open(release, "w").close()
        self.assertEqual(self.wait_done(job_id)["state"], "succeeded")
        full = first + second
        tail = "\n[jobrunner] attempt 1/1 succeeded after "
        end = self.output_text(job_id, raw=True)
        self.assertTrue(end.startswith(full + tail), end)
        size = len(end.encode())
        for limit in (1, 2, 3, 5, 65536):
            replies = self.read_output(job_id, limit)
            text = "".join(r["data"] for r in replies)
            self.assertEqual(text, end, "limit=%d: %r" % (limit, [r["data"] for r in replies]))
            self.assertNotIn("\ufffd", text)
            self.assertEqual([r["eof"] for r in replies], [False] * (len(replies) - 1) + [True],
                             "limit=%d" % limit)
            self.assertEqual(replies[-1]["offset"], size)
        reply = self.call(op="output", id=job_id, offset=size)
        self.assertEqual((reply["data"], reply["offset"], reply["eof"]), ("", size, True))
        reply = self.call(op="output", id=job_id, offset=size1, limit=1 << 20)
        self.assertEqual((reply["data"][:len(second)], reply["eof"]), (second, True))

    def test_stats(self):
        reply = self.assertOk(self.call(op="stats"), "counts", "workers", "paused", "uptime",
                              "protocol")
        self.assertEqual(reply["counts"], dict.fromkeys(STATES, 0))
        self.assertEqual(reply["workers"], 2)
        self.assertIs(reply["paused"], False)
        self.assertIsInstance(reply["uptime"], (int, float))
        self.assertGreaterEqual(reply["uptime"], 0)
        self.assertEqual(reply["protocol"], 1)
        self.pause()
        self.add()
        self.add()
        self.assertOk(self.call(op="cancel", id=2), "job")
        reply = self.call(op="stats")
        self.assertEqual(reply["counts"], dict(dict.fromkeys(STATES, 0), pending=1, cancelled=1))
        self.assertIs(reply["paused"], True)

    def test_pause_resume_kept_across_restart(self):
        self.assertEqual(self.assertOk(self.call(op="pause"), "paused"),
                         {"ok": True, "paused": True})
        self.assertEqual(self.call(op="pause"), {"ok": True, "paused": True})
        job_id = self.add()
        reply = self.call(op="wait", id=job_id, timeout=0.5)
        self.assertEqual((reply["done"], reply["job"]["state"]), (False, "pending"))
        self.assertEqual(self.daemon.stop(), 0)
        self.daemon.start()
        self.assertIs(self.call(op="stats")["paused"], True)
        self.assertEqual(self.get(job_id)["state"], "pending")
        self.assertEqual(self.assertOk(self.call(op="resume"), "paused"),
                         {"ok": True, "paused": False})
        self.assertEqual(self.call(op="resume"), {"ok": True, "paused": False})
        self.assertEqual(self.wait_done(job_id)["state"], "succeeded")
        self.assertIs(self.call(op="stats")["paused"], False)

    def test_prune(self):
        done = [self.add(), self.add("examples.jobs:ErrorJob")]
        for job_id in done:
            self.wait_done(job_id)
        later = self.add(delay=3600)
        output_dir = os.path.join(self.daemon.log_dir, "output")
        self.assertEqual(self.assertOk(self.call(op="prune", older_than=3600), "removed"),
                         {"ok": True, "removed": 0})
        self.assertEqual(self.assertOk(self.call(op="prune"), "removed"),
                         {"ok": True, "removed": 2})
        for job_id in done:
            self.assertError(self.call(op="get", id=job_id), "not_found")
            self.assertError(self.call(op="output", id=job_id), "not_found")
        self.assertEqual(self.all_ids(), [later])
        self.assertEqual(self.get(later)["state"], "pending")
        if os.path.isdir(output_dir):
            self.assertEqual(os.listdir(output_dir), [])
        self.assertEqual(self.call(op="prune", older_than=0), {"ok": True, "removed": 0})


####################################################################################################
#  Error codes a client can provoke
####################################################################################################

class ErrorsTest(ProtocolTestCase):
    config = {"kill_grace": 0.5}        # the default allow list: examples.*:* only

    def setUp(self):
        super().setUp()
        self.pause()
        self.first = self.add()     # job 1 exists: validation errors are not mere not_found

    def assertNothingAdded(self):
        self.assertEqual(self.all_ids(), [self.first])
        self.assertEqual(self.counts(), dict(dict.fromkeys(STATES, 0), pending=1))

    def raw_lines(self, lines):
        """Send raw request lines on one connection; their replies."""
        with self.daemon.raw(timeout=20) as c:
            c.send_line(b"".join(line + b"\n" for line in lines))
            return [c.recv() for _ in lines]

    def test_bad_request_not_json_or_not_object(self):
        lines = [b"hello", b"{", b'{"op": "hello"', b"{'op': 'hello'}", b'{"op": "hello"} x',
                 b"", b"   ", b"[1, 2]", b'"hello"', b"42", b"null", b"true",
                 b'[{"op": "hello"}]']
        for line, reply in zip(lines, self.raw_lines(lines)):
            self.assertError(reply, "bad_request", "%r -> %r" % (line, reply))
        self.assertOk(self.call(op="hello"), "protocol", "version")

    def test_bad_request_fields(self):
        now = time.time()
        bad = [
            {},
            {"target": T},                                        # no op
            {"op": 5},
            {"op": "add"},                                        # missing target
            {"op": "add", "target": None},
            {"op": "add", "target": 5},
            {"op": "add", "target": "examples.jobs"},
            {"op": "add", "target": "examples.jobs:"},
            {"op": "add", "target": "examples.jobs:ExampleJob; rm -rf /"},
            {"op": "add", "target": T, "args": "a"},
            {"op": "add", "target": T, "args": {"a": 1}},
            {"op": "add", "target": T, "kwargs": [1]},
            {"op": "add", "target": T, "kwargs": "k=1"},
            {"op": "add", "target": T, "priority": "1"},
            {"op": "add", "target": T, "priority": 1.5},
            {"op": "add", "target": T, "priority": True},
            {"op": "add", "target": T, "priority": None},
            {"op": "add", "target": T, "retries": -1},
            {"op": "add", "target": T, "retries": "3"},
            {"op": "add", "target": T, "retry_delay": "1"},
            {"op": "add", "target": T, "retry_delay": -0.5},
            {"op": "add", "target": T, "backoff": "linear"},
            {"op": "add", "target": T, "backoff": 2},
            {"op": "add", "target": T, "timeout": "10"},
            {"op": "add", "target": T, "timeout": -1},
            {"op": "add", "target": T, "delay": -1},
            {"op": "add", "target": T, "delay": "5"},
            {"op": "add", "target": T, "run_at": "tomorrow"},
            {"op": "add", "target": T, "delay": 1, "run_at": now + 5},
            {"op": "add", "target": T, "delay": 0, "run_at": now},
            {"op": "add", "target": T, "key": 5},
            {"op": "add", "target": T, "key": ["k"]},
            {"op": "add", "target": T, "method": 5},
            {"op": "add", "target": T, "method": ["handle"]},
            {"op": "add", "target": T, "method": "_private"},
            {"op": "add", "target": T, "method": "__init__"},
            {"op": "add", "target": T, "method": "__class__"},
            {"op": "add", "target": T, "priorty": 5},             # the typo SPEC names
            {"op": "add", "target": T, "id": 1},
            {"op": "add_batch"},
            {"op": "add_batch", "jobs": "x"},
            {"op": "add_batch", "jobs": {"target": T}},
            {"op": "add_batch", "jobs": [5]},
            {"op": "add_batch", "jobs": [{"target": T}, {"target": T, "priorty": 1}]},
            {"op": "add_batch", "jobs": [{"target": T}, {"target": T, "method": "_x"}]},
            {"op": "add_batch", "jobs": [{"target": T}, {}]},
            {"op": "add_batch", "jobs": [{"target": T}], "priorty": 1},
            {"op": "get"},
            {"op": "get", "id": "1"},
            {"op": "get", "id": 1.5},
            {"op": "get", "id": True},
            {"op": "get", "id": None},
            {"op": "get", "id": 1, "verbose": True},
            {"op": "list", "state": "bogus"},
            {"op": "list", "state": 1},
            {"op": "list", "limit": 0},
            {"op": "list", "limit": 1001},
            {"op": "list", "limit": "5"},
            {"op": "list", "after_id": "x"},
            {"op": "list", "target": 5},
            {"op": "list", "sort": "id"},
            {"op": "cancel"},
            {"op": "cancel", "id": "1"},
            {"op": "retry"},
            {"op": "retry", "id": [1]},
            {"op": "wait"},
            {"op": "wait", "id": 1, "timeout": -1},
            {"op": "wait", "id": 1, "timeout": "1"},
            {"op": "output"},
            {"op": "output", "id": 1, "offset": -1},
            {"op": "output", "id": 1, "offset": "0"},
            {"op": "output", "id": 1, "limit": -1},
            {"op": "prune", "older_than": -1},
            {"op": "prune", "older_than": "1"},
            {"op": "hello", "priorty": 1},
            {"op": "stats", "x": 1},
            {"op": "pause", "now": True},
            {"op": "resume", "x": 1},
        ]
        lines = [json.dumps(req).encode() for req in bad]
        for req, reply in zip(bad, self.raw_lines(lines)):
            self.assertError(reply, "bad_request", "%r -> %r" % (req, reply))
        self.assertNothingAdded()
        self.assertIs(self.call(op="stats")["paused"], True)

    def test_bad_request_numbers(self):
        add = b'{"op": "add", "target": "examples.jobs:ExampleJob", '
        lines = [
            add + b'"priority": NaN}',
            add + b'"priority": Infinity}',
            add + b'"delay": -Infinity}',
            add + b'"delay": 1e999}',
            add + b'"args": [NaN]}',
            add + b'"args": [1e999]}',
            add + b'"args": [-1e999]}',
            b'{"op": "get", "id": 1e999}',
            add + b'"priority": 1000000000000000000000000000000}',
            add + b'"retries": 100000000000000000000}',
            b'{"op": "get", "id": 1000000000000000000000000000000}',
            b'{"op": "list", "limit": 1000000000000000000000000000000}',
            add + b'"args": [' + b"9" * 5000 + b"]}",
        ]
        for line, reply in zip(lines, self.raw_lines(lines)):
            self.assertError(reply, "bad_request", "%r -> %r" % (line[:120], reply))
        self.assertNothingAdded()

    def test_bad_request_deep_nesting(self):
        depth = 100000
        lines = [
            b'{"op": "add", "target": "examples.jobs:echo", "args": '
            + b"[" * depth + b"]" * depth + b"}",
            b'{"op": "add", "target": "examples.jobs:echo", "kwargs": '
            + b'{"a": ' * depth + b"1" + b"}" * depth + b"}",
            b'{"op": "hello", "x": ' + b"[" * depth + b"]" * depth + b"}",
        ]
        for reply in self.raw_lines(lines):
            self.assertError(reply, "bad_request")
        self.assertNothingAdded()

    def test_nesting_near_the_parser_limit_never_half_adds_a_job(self):
        # Depths around Python's recursion limit: each add is either accepted whole or refused
        # whole (bad_request, nothing added), and the daemon can still list what it holds.
        accepted = [self.first]
        with self.daemon.raw(timeout=30) as c:
            for depth in range(880, 1010, 2):
                c.send_line(b'{"op": "add", "target": "examples.jobs:echo", "args": '
                            + b"[" * depth + b"]" * depth + b"}\n")
                reply = c.recv()
                if reply["ok"]:
                    accepted.append(reply["id"])
                else:
                    self.assertError(reply, "bad_request")
        self.assertEqual(self.counts()["pending"], len(accepted))
        listed = self.call(op="list", limit=1000)
        self.assertOk(listed, "jobs", "more", "total")
        self.assertEqual([j["id"] for j in listed["jobs"]], accepted)

    def test_bad_request_not_utf8(self):
        add = b'{"op": "add", "target": "examples.jobs:echo", "args": ["'
        lines = [add + b'\xff\xfe"]}', add + b'\xc0\xaf"]}', add + b'\xed\xa0\x80"]}',
                 add + b'caf\xe9"]}', b'{"op": "hello\x80"}']
        for line, reply in zip(lines, self.raw_lines(lines)):
            self.assertError(reply, "bad_request", "%r -> %r" % (line, reply))
        self.assertNothingAdded()

    def test_lone_surrogate_escape_does_not_crash_the_daemon(self):
        # "\ud800" is valid JSON text but no Unicode character: it cannot be UTF-8 encoded.
        lines = [b'{"op": "add", "target": "examples.jobs:echo", "args": ["\\ud800"]}',
                 b'{"op": "add", "target": "examples.jobs:echo", "key": "\\udc80"}',
                 b'{"op": "add", "target": "examples.jobs:echo", "kwargs": {"\\ud83d": 1}}']
        for line in lines:
            with self.daemon.raw(timeout=10) as c:
                c.send_line(line + b"\n")
                try:
                    reply = c.recv()
                except (ConnectionError, OSError) as exc:
                    self.fail("no reply to %r: %s; daemon exit status %s; stderr tail: %s"
                              % (line, exc, self.daemon.proc.poll(),
                                 self.daemon.read_stderr()[-400:]))
            if not reply["ok"]:
                self.assertError(reply, "bad_request")
            self.assertOk(self.call(op="hello"), "protocol", "version")
        self.assertIsNone(self.daemon.proc.poll())

    def test_unknown_op(self):
        for op in ("nope", "HELLO", "", "_hello", "__init__", "op_hello", "add ", "handlers"):
            self.assertError(self.call(op=op), "unknown_op", op)
        self.assertNothingAdded()

    def test_not_allowed(self):
        for target in ("os:system", "subprocess:run", "builtins:eval", "examples:ExampleJob",
                       "examplesx.jobs:ExampleJob", "tests.support:Daemon",
                       "testjobs_e2e:value"):
            self.assertError(self.call(op="add", target=target), "not_allowed", target)
        self.assertError(self.call(op="add_batch", jobs=[{"target": T},
                                                         {"target": "os:system"}]),
                         "not_allowed")
        self.assertNothingAdded()

    def test_not_found(self):
        for op in ("get", "cancel", "retry", "wait", "output"):
            self.assertError(self.call(op=op, id=424242), "not_found", op)
            self.assertError(self.call(op=op, id=0), "not_found", op)
        self.assertNothingAdded()

    def test_invalid_state(self):
        self.resume()
        self.assertEqual(self.wait_done(self.first)["state"], "succeeded")
        self.assertError(self.call(op="cancel", id=self.first), "invalid_state")
        self.assertError(self.call(op="retry", id=self.first), "invalid_state")
        failed = self.add("examples.jobs:ErrorJob", key="K")
        self.assertEqual(self.wait_done(failed)["state"], "failed")
        self.assertError(self.call(op="cancel", id=failed), "invalid_state")
        self.pause()
        pending = self.add()
        self.assertError(self.call(op="retry", id=pending), "invalid_state")
        self.assertOk(self.call(op="cancel", id=pending), "job")
        self.assertError(self.call(op="cancel", id=pending), "invalid_state")
        # the failed job's key is free: a new live job takes it, and then the old one cannot
        # be retried while that one lives
        holder = self.call(op="add", target=T, key="K")
        self.assertEqual((holder["ok"], holder["created"]), (True, True))
        self.assertError(self.call(op="retry", id=failed), "invalid_state")
        self.assertEqual(self.get(failed)["state"], "failed")
        self.assertOk(self.call(op="cancel", id=holder["id"]), "job")
        job = self.assertOk(self.call(op="retry", id=failed), "job")["job"]
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0))


class TooLargeTest(ProtocolTestCase):
    config = dict(ProtocolTestCase.config, max_request_bytes=1024)

    def test_too_large_closes_the_connection(self):
        with self.daemon.raw(timeout=10) as c:
            ok_line = json.dumps({"op": "add", "target": T, "args": ["x" * 800]}).encode()
            self.assertLess(len(ok_line), 1024)
            c.send_line(ok_line + b"\n")
            self.assertOk(c.recv(), "id", "created")
            big = json.dumps({"op": "add", "target": T, "args": ["y" * 2000]}).encode()
            # pipelined: the hello before the long line is answered, then too_large, then EOF
            c.send_line(b'{"op": "hello"}\n' + big + b'\n{"op": "hello"}\n')
            self.assertOk(c.recv(), "protocol", "version")
            self.assertError(c.recv(), "too_large")
            self.assertEqual(c.file.readline(), b"")
        with self.daemon.raw(timeout=10) as c:        # no newline at all, still too long
            try:
                c.send_line(b'{"op": "hello", "pad": "' + b"z" * 4000)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.assertError(c.recv(), "too_large")
            self.assertEqual(c.file.readline(), b"")
        self.assertOk(self.call(op="hello"), "protocol", "version")
        self.assertEqual(self.all_ids(), [1])


def send_reading(sock, data: bytes, timeout: float) -> bytes:
    """Send `data` in 64 KiB pieces as jobctl does, reading replies meanwhile; return what was
    read by the time the daemon hung up (or everything was sent and a reply line came)."""
    got, pos, deadline = b"", 0, time.monotonic() + timeout
    sock.setblocking(False)
    while time.monotonic() < deadline:
        readable, writable, _ = select.select([sock], [sock] if pos < len(data) else [], [],
                                              max(deadline - time.monotonic(), 0))
        if readable:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return got
            got += chunk
            if pos == len(data) and got.endswith(b"\n"):
                return got
        if writable:
            try:
                pos += sock.send(data[pos:pos + 65536])
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                pos = len(data)
    raise AssertionError("no answer within %gs (%d of %d bytes sent, got %r)"
                         % (timeout, pos, len(data), got[:200]))


class LongLineTest(ProtocolTestCase):
    """A line longer than max_request_bytes, arriving in pieces: too_large at once, not a
    stalled connection (the daemon used to stop reading at 1 MiB of unhandled input, before
    the line was known to be too long, and hang up 60 s later)."""

    def test_too_large_at_the_default_limit_while_the_client_keeps_sending(self):
        jobs = [{"target": T, "args": ["x" * 2500, i]} for i in range(600)]       # ~1.5 MB
        line = json.dumps({"op": "add_batch", "jobs": jobs}).encode() + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(self.daemon.socket)
            got = send_reading(sock, line, timeout=20)
        self.assertEqual(json.loads(got.split(b"\n")[0])["error"]["code"], "too_large", got)
        self.assertEqual(self.all_ids(), [])


class LongLimitTest(ProtocolTestCase):
    config = dict(ProtocolTestCase.config, max_request_bytes=3 * 1024 * 1024)

    def test_a_request_longer_than_a_mebibyte_is_served_when_the_limit_allows(self):
        jobs = [{"target": T, "args": ["x" * 2500, i]} for i in range(800)]       # ~2 MB
        line = json.dumps({"op": "add_batch", "jobs": jobs}).encode() + b"\n"
        self.assertGreater(len(line), 2 * 1024 * 1024 - 100_000)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(self.daemon.socket)
            got = send_reading(sock, line, timeout=30)
        self.assertEqual(json.loads(got)["ids"], list(range(1, 801)))


class QueueFullTest(ProtocolTestCase):
    config = dict(ProtocolTestCase.config, max_queued=3)

    def test_queue_full(self):
        self.pause()
        ids = [self.add(key="k%d" % i) for i in range(3)]
        self.assertError(self.call(op="add", target=T), "queue_full")
        self.assertError(self.call(op="add_batch", jobs=[{"target": T}]), "queue_full")
        # a key that matches a live job adds nothing, so it is not refused
        self.assertEqual(self.call(op="add", target=T, key="k0"),
                         {"ok": True, "id": ids[0], "created": False})
        self.assertEqual(self.counts()["pending"], 3)
        self.assertOk(self.call(op="cancel", id=ids[0]), "job")
        self.assertOk(self.call(op="cancel", id=ids[1]), "job")
        # two free places: a batch of three is refused whole, a batch of two fits
        self.assertError(self.call(op="add_batch", jobs=[{"target": T}] * 3), "queue_full")
        self.assertEqual(self.counts()["pending"], 1)
        new = self.assertOk(self.call(op="add_batch", jobs=[{"target": T}] * 2), "ids")["ids"]
        self.assertEqual(len(new), 2)
        self.assertError(self.call(op="retry", id=ids[0]), "queue_full")
        self.assertEqual(self.get(ids[0])["state"], "cancelled")
        # finished jobs do not count
        self.resume()
        for job_id in [ids[2]] + new:
            self.wait_done(job_id)
        self.pause()                    # what is queued now must stay queued (no job ends)
        self.assertOk(self.call(op="retry", id=ids[0]), "job")
        self.add()
        self.add()
        self.assertError(self.call(op="add", target=T), "queue_full")


class BusyTest(ProtocolTestCase):
    config = dict(ProtocolTestCase.config, max_connections=2)

    def connect(self):
        """A connection the daemon has accepted (the fixture's probe may still be closing)."""
        def attempt():
            conn = self.daemon.raw(timeout=10)
            reply = conn.call(op="hello")
            if reply["ok"]:
                return conn
            conn.close()
            self.assertError(reply, "busy")
            return None
        return wait_until(attempt, message="a free connection")

    def test_busy(self):
        a = self.connect()
        self.addCleanup(a.close)
        b = self.connect()
        self.addCleanup(b.close)
        with self.daemon.raw(timeout=10) as c:
            self.assertError(c.recv(), "busy")
            self.assertEqual(c.file.readline(), b"")
        self.assertOk(a.call(op="add", target=T), "id", "created")
        self.assertOk(b.call(op="get", id=1), "job")
        a.close()
        d = self.connect()
        self.addCleanup(d.close)
        self.assertOk(d.call(op="stats"), "counts", "workers", "paused", "uptime", "protocol")
        self.assertOk(b.call(op="hello"), "protocol", "version")


class ShutdownTest(ProtocolTestCase):
    config = dict(ProtocolTestCase.config, shutdown_grace=120, workers=1)

    def test_shutting_down(self):
        release = self.path("release-shutdown")
        job_id = self.add("testjobs_e2e:wait_for", args=[release])
        self.daemon.wait_state(job_id, "running")
        with self.daemon.raw(timeout=20) as old:
            self.assertOk(old.call(op="hello"), "protocol", "version")
            self.daemon.proc.send_signal(signal.SIGTERM)
            # a harmless probe: not_found until the daemon has taken the signal in
            wait_until(lambda: old.call(op="cancel", id=999999)["error"]["code"]
                       == "shutting_down", message="the daemon to be stopping")
            self.assertError(old.call(op="add", target=T), "shutting_down")
            with self.daemon.raw(timeout=20) as new:
                self.assertError(new.call(op="add", target=T), "shutting_down")
                self.assertError(new.call(op="add_batch", jobs=[{"target": T}]),
                                 "shutting_down")
                self.assertError(new.call(op="pause"), "shutting_down")
                # reads are still served while the running job finishes
                self.assertEqual(new.call(op="get", id=job_id)["job"]["state"], "running")
                self.assertEqual([j["id"] for j in new.call(op="list")["jobs"]], [job_id])
            self.assertIsNone(self.daemon.proc.poll())
            open(release, "w").close()
            self.assertEqual(self.daemon.proc.wait(30), 0)
        self.daemon.stderr.close()
        self.daemon.start()
        self.assertEqual(self.all_ids(), [job_id])
        job = self.get(job_id)
        self.assertEqual((job["state"], job["result"]), ("succeeded", "released"))


class ForbiddenTest(ProtocolTestCase):
    config = dict(ProtocolTestCase.config, socket_mode=0o666)

    def test_forbidden_peer(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to connect as another user (nobody)")
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            self.skipTest("no user 'nobody'")
        os.chmod(self.root, 0o755)
        request = (json.dumps({"op": "add", "target": T}) + "\n").encode()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                    # the child: never returns
            code = 0
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(10)
                s.connect(self.daemon.socket)
                try:
                    s.sendall(request)
                except OSError:
                    pass
                data = b""
                while True:
                    try:
                        chunk = s.recv(65536)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    data += chunk
                os.write(w, data)
            except BaseException as exc:
                os.write(w, b"CHILD ERROR " + repr(exc).encode())
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0, data)
        lines = data.splitlines()
        self.assertEqual(len(lines), 1, data)              # one error, then closed
        self.assertError(json.loads(lines[0]), "forbidden")
        self.assertEqual(self.all_ids(), [])
        self.assertEqual(self.counts(), dict.fromkeys(STATES, 0))
        self.assertOk(self.call(op="hello"), "protocol", "version")


####################################################################################################
#  Scheduling: priority, FIFO, delays, retries and backoff, unique keys
####################################################################################################

class SchedulingTest(ProtocolTestCase):
    config = dict(ProtocolTestCase.config, workers=1, max_retry_delay=0.5)

    def test_priority_then_fifo(self):
        self.pause()
        plan = [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1), ("f", 0), ("g", 5)]
        ids = {name: self.add(args=[name], priority=prio) for name, prio in plan}
        self.resume()
        jobs = [self.wait_done(job_id) for job_id in ids.values()]
        self.assertTrue(all(j["state"] == "succeeded" for j in jobs), jobs)
        by_start = [j["args"][0] for j in sorted(jobs, key=lambda j: j["started_at"])]
        self.assertEqual(by_start, ["b", "d", "g", "a", "c", "f", "e"])
        started = [int(e["job"]) for e in self.daemon.events() if e["event"] == "started"]
        names = {v: k for k, v in ids.items()}
        self.assertEqual([names[i] for i in started], ["b", "d", "g", "a", "c", "f", "e"])

    def test_delay(self):
        job_id = self.add(delay=0.6)
        job = self.get(job_id)
        if time.time() < job["run_at"]:
            self.assertEqual(job["state"], "pending")
        self.assertAlmostEqual(job["run_at"], job["created_at"] + 0.6, delta=0.01)
        job = self.wait_done(job_id)
        self.assertEqual(job["state"], "succeeded")
        self.assertGreaterEqual(job["started_at"], job["run_at"])
        self.assertGreaterEqual(job["started_at"], job["created_at"] + 0.6)
        self.assertLess(job["started_at"], job["run_at"] + 5)
        started = self.wait_events(job_id, "started")[0]
        self.assertGreaterEqual(log_ts(started["time"]), job["run_at"] - 0.001)

    def test_run_at(self):
        run_at = time.time() + 0.6
        job_id = self.add(run_at=run_at)
        job = self.get(job_id)
        self.assertAlmostEqual(job["run_at"], run_at, delta=0.001)
        job = self.wait_done(job_id)
        self.assertEqual(job["state"], "succeeded")
        self.assertGreaterEqual(job["started_at"], run_at)
        self.assertLess(job["started_at"], run_at + 5)
        # a run_at in the past runs at once
        past = self.add(run_at=time.time() - 60)
        self.assertEqual(self.wait_done(past)["state"], "succeeded")

    def check_retries(self, backoff, retry_delay, expected_gaps):
        job_id = self.add("examples.jobs:ErrorJob", retries=len(expected_gaps),
                          retry_delay=retry_delay, backoff=backoff)
        job = self.wait_done(job_id)
        n = len(expected_gaps) + 1
        self.assertEqual(job["state"], "failed")
        self.assertEqual(job["attempts"], n)
        self.assertEqual((job["retries"], job["retry_delay"], job["backoff"]),
                         (n - 1, retry_delay, backoff))
        self.assertIn("ErrorJob always fails (attempt %d)" % n, job["error"])
        self.assertNotIn("\n", job["error"])
        self.assertNotEqual(job["exit_code"], 0)
        events = self.wait_events(job_id, "failed")
        events = [e for e in self.daemon.job_events(job_id) if e["event"] != "queued"]
        self.assertEqual([e["event"] for e in events],
                         ["started", "retrying"] * (n - 1) + ["started", "failed"])
        self.assertEqual([e["attempt"] for e in events if e["event"] != "started"],
                         ["%d/%d" % (k, n) for k in range(1, n + 1)])
        self.assertEqual([e["attempt"] for e in events if e["event"] == "started"],
                         ["%d/%d" % (k, n) for k in range(1, n + 1)])
        starts = [log_ts(e["time"]) for e in events if e["event"] == "started"]
        fails = [log_ts(e["time"]) for e in events if e["event"] == "retrying"]
        run_ats = [float(e["run_at"]) for e in events if e["event"] == "retrying"]
        for k, expected in enumerate(expected_gaps):
            gap = starts[k + 1] - starts[k]
            self.assertGreaterEqual(gap, expected, "start of attempt %d" % (k + 2))
            self.assertLess(gap, expected + 5.0, "start of attempt %d" % (k + 2))
            # The delay counts from the failure (read just before its log line's time), and
            # the next attempt starts at run_at, not before (log times are rounded to 1 ms).
            self.assertAlmostEqual(run_ats[k] - fails[k], expected, delta=0.5,
                                   msg="run_at of retry %d" % (k + 1))
            self.assertLessEqual(run_ats[k] - fails[k], expected + 0.0005)
            self.assertGreaterEqual(starts[k + 1], run_ats[k] - 0.0005, "retry %d" % (k + 1))
            self.assertLess(starts[k + 1] - run_ats[k], 1.0, "retry %d" % (k + 1))
        return job

    def test_retries_fixed_backoff(self):
        self.check_retries("fixed", 0.2, [0.2, 0.2])

    def test_retries_exponential_backoff(self):
        self.check_retries("exponential", 0.2, [0.2, 0.4])

    def test_retry_delay_capped_by_max_retry_delay(self):
        # uncapped these would be 2 s and 4 s; the class config caps them at 0.5 s
        self.check_retries("exponential", 2.0, [0.5, 0.5])

    def test_unique_key(self):
        self.pause()
        first = self.call(op="add", target=T, args=[1], key="k")
        self.assertEqual(first, {"ok": True, "id": 1, "created": True})
        self.assertEqual(self.call(op="add", target=T, args=[2], key="k"),
                         {"ok": True, "id": 1, "created": False})
        self.assertEqual(self.get(1)["args"], [1])
        self.assertEqual(self.call(op="add_batch", jobs=[{"target": T, "key": "k"},
                                                         {"target": T, "key": "k2"},
                                                         {"target": T, "key": "k2"}]),
                         {"ok": True, "ids": [1, 2, 2]})
        self.assertEqual(self.all_ids(), [1, 2])
        self.resume()
        self.wait_done(1)
        again = self.call(op="add", target=T, key="k")
        self.assertEqual((again["ok"], again["created"]), (True, True))
        self.assertGreater(again["id"], 2)
        self.wait_done(again["id"])
        # while running the key still matches
        release = self.path("release-key")
        running = self.add("testjobs_e2e:wait_for", args=[release], key="r")
        self.daemon.wait_state(running, "running")
        self.assertEqual(self.call(op="add", target=T, key="r"),
                         {"ok": True, "id": running, "created": False})
        open(release, "w").close()
        self.wait_done(running)
        fresh = self.call(op="add", target=T, key="r")
        self.assertEqual((fresh["ok"], fresh["created"]), (True, True))
        self.assertNotEqual(fresh["id"], running)
        # a cancelled job frees its key
        self.pause()
        cancelled = self.add(key="c")
        self.call(op="cancel", id=cancelled)
        other = self.call(op="add", target=T, key="c")
        self.assertEqual((other["ok"], other["created"]), (True, True))
        self.assertNotEqual(other["id"], cancelled)


####################################################################################################
#  Job processes: timeouts, cancel, results, arguments, environment
####################################################################################################

class ProcessTest(ProtocolTestCase):
    config = dict(ProtocolTestCase.config, workers=2, kill_grace=0.5)

    def running_pid_line(self, job_id):
        """Wait until the job printed its first line (a pid, or "ready"); return it."""
        def first_line():
            text = self.output_text(job_id)
            return text.split("\n")[0] if "\n" in text else None
        return wait_until(first_line, message="job %d's first line" % job_id)

    def test_timeout_kills_the_process_group(self):
        # 3 s: time for the job to start its grandchild and print its pid on a loaded machine.
        job_id = self.add("examples.jobs:spawn_grandchild", args=[60], timeout=3)
        grandchild = int(self.running_pid_line(job_id))
        job = self.wait_done(job_id, timeout=30)
        self.assertEqual(job["state"], "failed")
        self.assertEqual(job["attempts"], 1)
        self.assertRegex(job["error"].lower(), r"time(d)?[ _-]?out")
        self.assertGreaterEqual(job["finished_at"] - job["started_at"], job["timeout"])
        self.assertLess(job["finished_at"] - job["started_at"], 12.0)
        line = self.wait_events(job_id, "timed_out")[0]
        self.assertEqual(line["target"], "examples.jobs:spawn_grandchild")
        self.assertEqual(line["attempt"], "1/1")
        self.wait_events(job_id, "failed")
        wait_until(lambda: process_gone(grandchild), 10, message="grandchild %d to die"
                   % grandchild)

    def test_cancel_running_job_kills_the_process_group(self):
        job_id = self.add("examples.jobs:spawn_grandchild", args=[60])
        grandchild = int(self.running_pid_line(job_id))
        job = self.get(job_id)
        self.assertEqual(job["state"], "running")
        pgid = job["pid"]
        self.assertIsInstance(pgid, int)
        self.assertFalse(group_gone(pgid))
        reply = self.assertOk(self.call(op="cancel", id=job_id), "job")
        self.assertEqual(reply["job"]["state"], "cancelled")
        wait_until(lambda: group_gone(pgid), 10, message="process group %d to end" % pgid)
        wait_until(lambda: process_gone(grandchild), 10, message="grandchild to die")
        line = self.wait_events(job_id, "cancelled")[0]
        self.assertEqual(line["target"], "examples.jobs:spawn_grandchild")
        job = wait_until(lambda: self.get(job_id)["pid"] is None and self.get(job_id),
                         message="the attempt to be over")
        self.assertEqual(job["state"], "cancelled")
        self.assertEqual(self.daemon.job_events(job_id, "failed"), [])
        self.assertEqual(self.daemon.job_events(job_id, "succeeded"), [])

    def test_cancel_escalates_to_sigkill_after_kill_grace(self):
        job_id = self.add("testjobs_e2e:stubborn", args=[60])
        self.assertEqual(self.running_pid_line(job_id), "ready")
        pgid = self.get(job_id)["pid"]
        start = time.monotonic()
        self.assertOk(self.call(op="cancel", id=job_id), "job")
        wait_until(lambda: group_gone(pgid), 10, message="process group %d to end" % pgid)
        self.assertGreaterEqual(time.monotonic() - start, 0.45)     # it survived SIGTERM
        self.assertEqual(self.get(job_id)["state"], "cancelled")

    def test_retry_right_after_cancel_of_running_job(self):
        # SPEC §2: a cancelled job can be put back with retry; invalid_state only for a key
        job_id = self.add("testjobs_e2e:stubborn", args=[60])
        self.assertEqual(self.running_pid_line(job_id), "ready")
        self.assertOk(self.call(op="cancel", id=job_id), "job")
        reply = self.call(op="retry", id=job_id)
        self.assertOk(reply, "job")
        self.assertEqual(reply["job"]["attempts"], 0)
        self.assertIn(reply["job"]["state"], ("pending", "running"))
        self.call(op="cancel", id=job_id)

    def test_results(self):
        cases = [
            ("testjobs_e2e:value", [{"a": [1, 2.5, None, True], "s": "é😀"}],
             {"a": [1, 2.5, None, True], "s": "é😀"}),
            ("testjobs_e2e:value", [None], None),
            ("examples.jobs:add", [2, 3], 5),
            ("examples.jobs:Outer.Inner", [], "inner"),
            ("testjobs_e2e:sized", [65534], "x" * 65534),    # 65536 bytes encoded: kept
            ("testjobs_e2e:sized", [65535], None),           # 65537 bytes: not kept
            ("testjobs_e2e:sized", [200000], None),
            ("testjobs_e2e:a_set", [], None),
            ("testjobs_e2e:nan", [], None),
            ("testjobs_e2e:an_object", [], None),
        ]
        ids = self.assertOk(self.call(op="add_batch", jobs=[
            {"target": target, "args": args} for target, args, _ in cases]), "ids")["ids"]
        for job_id, (target, args, expected) in zip(ids, cases):
            job = self.wait_done(job_id)
            self.assertEqual(job["state"], "succeeded", (target, args, job["error"]))
            self.assertEqual(job["result"], expected, (target, args))

    def test_arguments_reach_the_job_verbatim(self):
        marks = [self.path("pwned%d" % i) for i in range(7)]
        args = [
            "$(touch %s)" % marks[0], "`touch %s`" % marks[1], "; touch %s" % marks[2],
            "| touch %s" % marks[3], "&& touch %s #" % marks[4], "\ntouch %s\n" % marks[5],
            "'; touch %s; '" % marks[6],
            "-rf", "--help", "-", "--", "", " ", "a b", "'single'", '"double"', "back\\slash",
            "tab\there", "new\nline", "cr\rlf", "nul\x00byte", "é", "日本語", "😀", "\u2028",
            "%s %d {}", "*", "~", "$HOME", "${PATH}",
            0, -1, 2 ** 53, 1.5, -0.25, True, False, None, [], {}, [1, [2, [3]]],
            {"nested": {"list": ["a", {"b": None}], "n": 1}},
        ]
        kwargs = {"key": "$(touch %s)" % marks[0], "dash-key": "-x", "emoji": "🎉",
                  "obj": {"a": [1, "two"]}, "empty": ""}
        job_id = self.add("examples.jobs:echo", args=args, kwargs=kwargs)
        self.assertEqual(self.get(job_id)["args"], args)
        job = self.wait_done(job_id)
        self.assertEqual(job["state"], "succeeded", job["error"])
        self.assertEqual(job["result"], {"args": args, "kwargs": kwargs})
        printed = json.loads(self.output_text(job_id))
        self.assertEqual(printed, {"args": args, "kwargs": kwargs})
        for mark in marks:
            self.assertFalse(os.path.exists(mark), mark)
        # a class method gets them the same way
        job = self.wait_done(self.add(T, method="handle", args=args[:10]))
        self.assertEqual(job["result"], {"params": args[:10]})

    def test_child_environment(self):
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(notify.close)
        notify.bind(self.path("notify.sock"))
        self.assertEqual(self.daemon.stop(), 0)
        self.daemon.start(env=daemon_env(NOTIFY_SOCKET=self.path("notify.sock"),
                                         LISTEN_FDS="1", LISTEN_FDNAMES="jobrunner",
                                         LISTEN_PID="1", WATCHDOG_PID="1", JR_E2E_MARK="kept"))
        names = ["JOBRUNNER_JOB_ID", "JOBRUNNER_ATTEMPT", "NOTIFY_SOCKET", "LISTEN_FDS",
                 "LISTEN_FDNAMES", "LISTEN_PID", "WATCHDOG_PID", "JR_E2E_MARK"]
        ids = self.call(op="add_batch", jobs=[
            {"target": "examples.jobs:env", "args": [name]} for name in names])["ids"]
        results = {name: self.wait_done(job_id)["result"] for name, job_id in zip(names, ids)}
        self.assertEqual(results, {
            "JOBRUNNER_JOB_ID": str(ids[0]), "JOBRUNNER_ATTEMPT": "1", "NOTIFY_SOCKET": None,
            "LISTEN_FDS": None, "LISTEN_FDNAMES": None, "LISTEN_PID": None,
            "WATCHDOG_PID": None, "JR_E2E_MARK": "kept"})

    def test_attempt_number_in_environment(self):
        job = self.wait_done(self.add("examples.jobs:ErrorJob", retries=2, retry_delay=0.01,
                                      backoff="fixed"))
        self.assertEqual(job["attempts"], 3)
        self.assertIn("attempt 3", job["error"])
        self.assertIn("attempt 1", self.output_text(job["id"]))

    def test_permanent_failures_are_not_retried(self):
        cases = [("examples.jobs:NoSuchThing", None), ("examples.nosuchmodule:Job", None),
                 ("examples.jobs:add", "handle"), ("examples.jobs:ExampleJob", "nosuchmethod"),
                 ("examples.jobs:Outer.Missing", None)]
        ids = [self.add(target, method=method, retries=3, retry_delay=0.01)
               for target, method in cases]
        for job_id, case in zip(ids, cases):
            job = self.wait_done(job_id)
            self.assertEqual((job["state"], job["attempts"]), ("failed", 1), case)
            self.assertTrue(job["error"], case)
            self.assertEqual(len(self.daemon.job_events(job_id, "started")), 1, case)
            self.assertEqual(self.daemon.job_events(job_id, "retrying"), [], case)
            self.assertEqual(len(self.wait_events(job_id, "failed")), 1, case)


####################################################################################################
#  Pipelining
####################################################################################################

class PipeliningTest(ProtocolTestCase):

    def test_200_pipelined_adds(self):
        self.pause()
        with self.daemon.raw(timeout=30) as c:
            c.send_line(b"".join((json.dumps({"op": "add", "target": T, "args": [i]})
                                  + "\n").encode() for i in range(200)))
            replies = [c.recv() for _ in range(200)]
        for reply in replies:
            self.assertOk(reply, "id", "created")
        ids = [r["id"] for r in replies]
        self.assertEqual(ids, list(range(1, 201)))
        jobs = self.call(op="list", limit=1000)["jobs"]
        self.assertEqual([(j["id"], j["args"]) for j in jobs],
                         [(i + 1, [i]) for i in range(200)])

    def test_mixed_pipeline_replies_in_order(self):
        self.pause()
        with self.daemon.raw(timeout=30) as c:
            start = time.monotonic()    # before the send: the wait's timer may start at once
            c.send_line(b'{"op": "add", "target": "examples.jobs:ExampleJob", "args": ["p"]}\n'
                        b'{"op": "get", "id": 1}\n'
                        b'not json\n'
                        b'{"op": "nope"}\n'
                        b'{"op": "get", "id": 2}\n'
                        b'{"op": "wait", "id": 1, "timeout": 0.3}\n'
                        b'{"op": "hello"}\n')
            self.assertEqual(c.recv(), {"ok": True, "id": 1, "created": True})
            job = self.assertOk(c.recv(), "job")["job"]
            self.assertEqual((job["id"], job["args"], job["state"]), (1, ["p"], "pending"))
            self.assertError(c.recv(), "bad_request")
            self.assertError(c.recv(), "unknown_op")
            self.assertError(c.recv(), "not_found")
            reply = c.recv()
            self.assertEqual((reply["done"], reply["job"]["state"]), (False, "pending"))
            self.assertOk(c.recv(), "protocol", "version")      # held behind the wait
            self.assertGreaterEqual(time.monotonic() - start, 0.25)
            c.send_line(b'{"op": "resume"}\n{"op": "wait", "id": 1}\n{"op": "hello"}\n')
            self.assertEqual(c.recv(), {"ok": True, "paused": False})
            reply = c.recv()
            self.assertEqual((reply["done"], reply["job"]["state"]), (True, "succeeded"))
            self.assertOk(c.recv(), "protocol", "version")

    def test_request_behind_a_wait_sees_its_outcome(self):
        # Pipelining means the same answers as sending each request after the previous reply:
        # a get queued behind a wait must describe the job as the wait left it.
        release = self.path("release-pipeline")
        job_id = self.add("testjobs_e2e:wait_for", args=[release])
        self.daemon.wait_state(job_id, "running")
        with self.daemon.raw(timeout=30) as c:
            c.send(op="wait", id=job_id)
            c.send(op="get", id=job_id)
            c.send(op="cancel", id=job_id)      # must not overtake the wait
            # a round trip on another connection: the lines above, sent earlier, are read
            self.assertOk(self.call(op="hello"), "protocol", "version")
            open(release, "w").close()
            reply = c.recv()
            self.assertEqual((reply["done"], reply["job"]["state"]), (True, "succeeded"))
            self.assertEqual(c.recv()["job"]["state"], "succeeded")
            self.assertError(c.recv(), "invalid_state")     # too late to cancel
        self.assertEqual(self.get(job_id)["state"], "succeeded")

    def test_half_closed_client_gets_all_replies(self):
        with self.daemon.raw(timeout=30) as c:
            c.send_line(b'{"op": "hello"}\n{"op": "add", "target": "examples.jobs:ExampleJob"}\n'
                        b'{"op": "wait", "id": 1}\n')
            c.sock.shutdown(socket.SHUT_WR)
            self.assertOk(c.recv(), "protocol", "version")
            self.assertOk(c.recv(), "id", "created")
            self.assertEqual(c.recv()["job"]["state"], "succeeded")
            self.assertEqual(c.file.readline(), b"")


####################################################################################################
#  Logs
####################################################################################################

class LogTest(ProtocolTestCase):

    def read_log(self, name):
        with open(os.path.join(self.daemon.log_dir, name), encoding="utf-8") as f:
            return f.read()

    def test_event_lines(self):
        ok = self.add(args=["a b", 'q"uote'])
        failing = self.add("examples.jobs:ErrorJob", retries=1, retry_delay=0.05)
        self.pause()
        cancelled = self.add()
        self.call(op="cancel", id=cancelled)
        self.resume()
        okjob = self.wait_done(ok)
        self.wait_done(failing)
        self.wait_events(failing, "failed")
        text = self.read_log("background_jobs.log")
        self.assertTrue(text.endswith("\n"))
        self.assertEqual(text.splitlines(), text.split("\n")[:-1])
        for raw, event in zip(text.split("\n")[:-1], self.daemon.events()):
            self.assertRegex(raw, LOG_LINE_RE)
            self.assertRegex(event["time"], LOG_TIME_RE)
            self.assertEqual(list(event)[:2], ["time", "event"], raw)
            self.assertIn(event["event"], LOG_EVENTS, raw)
            if event["event"] not in ("startup", "shutdown"):
                self.assertRegex(event.get("job", ""), r"^\d+$", raw)
                self.assertIn("target", event, raw)
            if event["event"] in ("started", "succeeded", "retrying", "failed"):
                self.assertRegex(event.get("attempt", ""), r"^\d+/\d+$", raw)
            if event["event"] == "started":
                self.assertRegex(event.get("pid", ""), r"^\d+$", raw)
        self.assertTrue([e for e in self.daemon.events() if e["event"] == "startup"])
        seq = lambda job_id: [(e["event"], e.get("attempt"))  # noqa: E731
                              for e in self.daemon.job_events(job_id)]
        self.assertEqual(seq(ok), [("queued", None), ("started", "1/1"), ("succeeded", "1/1")])
        self.assertEqual(seq(failing), [("queued", None), ("started", "1/2"),
                                        ("retrying", "1/2"), ("started", "2/2"),
                                        ("failed", "2/2")])
        self.assertEqual([e["event"] for e in self.daemon.job_events(cancelled)],
                         ["queued", "cancelled"])
        for e in self.daemon.job_events(ok):
            self.assertEqual(e["target"], T)
        self.assertIn("duration", self.daemon.job_events(ok, "succeeded")[0])
        # UTC: the started line's time is the job's started_at
        started = self.daemon.job_events(ok, "started")[0]
        self.assertAlmostEqual(log_ts(started["time"]), okjob["started_at"], delta=1.0)

    def test_user_strings_cannot_forge_log_lines(self):
        forged = ("boom\n2026-11-28T16:00:00.000Z event=succeeded job=999 target=x:y\r\n"
                  "\x85next\u2028line\x1b[31m \"quoted\" \\ \x00 event=failed job=999")
        job_id = self.add("testjobs_e2e:fail_with", args=[forged], retries=1, retry_delay=0.01)
        job = self.wait_done(job_id)
        self.assertEqual(job["state"], "failed")
        self.assertNotIn("\n", job["error"])
        self.wait_events(job_id, "failed")
        text = self.read_log("background_jobs.log")
        self.assertEqual(text.splitlines(), text.split("\n")[:-1])
        self.assertNotRegex(text, r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
        events = self.daemon.events()
        for raw in text.split("\n")[:-1]:
            self.assertRegex(raw, LOG_LINE_RE)
        self.assertEqual([e for e in events if e.get("job") == "999"], [])
        failed = self.daemon.job_events(job_id, "failed")[0]
        self.assertIn("event=succeeded job=999", failed.get("error", ""))
        self.assertEqual(failed["target"], "testjobs_e2e:fail_with")
        errors = self.read_log("background_jobs_errors.log")
        self.assertEqual(errors.splitlines(), errors.split("\n")[:-1])
        headers = 0
        for raw in errors.split("\n")[:-1]:
            if LOG_LINE_RE.match(raw):
                headers += 1
                self.assertNotEqual(parse_job(raw), "999", raw)
            else:
                self.assertRegex(raw, r"^\s", raw)
        self.assertEqual(headers, 2)            # the retried attempt and the last one
        self.assertIn("event=succeeded job=999", errors)

    def test_errors_log_format(self):
        ids = [self.add("examples.jobs:ErrorJob", retries=1, retry_delay=0.01),
               self.add("examples.jobs:exit_with", args=[3])]
        for job_id in ids:
            self.assertEqual(self.wait_done(job_id)["state"], "failed")
            self.wait_events(job_id, "failed")
        text = self.read_log("background_jobs_errors.log")
        lines = text.split("\n")
        self.assertEqual(lines[-1], "")
        lines = lines[:-1]
        self.assertTrue(lines)
        self.assertRegex(lines[0], LOG_LINE_RE)
        blocks = []
        for raw in lines:
            if LOG_TIME_RE.match(raw.split(" ", 1)[0]):
                self.assertRegex(raw, LOG_LINE_RE)
                blocks.append([raw])
            else:
                self.assertRegex(raw, r"^\s+\S", raw)
                blocks[-1].append(raw)
        by_job = {}
        for block in blocks:
            by_job.setdefault(parse_job(block[0]), []).append(block)
            self.assertGreater(len(block), 1, "a header without its detail: %r" % block)
        self.assertEqual(len(by_job[str(ids[0])]), 2)
        self.assertEqual(len(by_job[str(ids[1])]), 1)
        for block in by_job[str(ids[0])]:
            self.assertIn("RuntimeError: ErrorJob always fails", "\n".join(block[1:]))
            self.assertIn("target=examples.jobs:ErrorJob", block[0])
        self.assertRegex(by_job[str(ids[1])][0][0], r"attempt=1/1")


def parse_job(header):
    match = re.search(r" job=(\S+)", header)
    return match.group(1) if match else None


if __name__ == "__main__":
    unittest.main()
