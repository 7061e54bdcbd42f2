"""jobctl without a daemon: argument parsing, rendering, socket resolution, and the
Client and CLI against a fake daemon (a thread answering canned replies on a temp
Unix socket, recording every request line it reads)."""
import contextlib
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jobctl  # noqa: E402
from examples import jobs as example_jobs  # noqa: E402

DEADLINE = 5.0  # seconds any fake-daemon interaction may take before the test fails


def job(id, state="pending", **fields):
    """A job record as the daemon would send it."""
    now = time.time()
    record = {"id": id, "target": "examples.jobs:ExampleJob", "method": "handle", "args": [],
              "kwargs": {}, "priority": 0, "state": state, "attempts": 0, "retries": 0,
              "retry_delay": 1.0, "backoff": "exponential", "timeout": 3600.0, "key": None,
              "created_at": now, "run_at": now, "started_at": None, "finished_at": None,
              "pid": None, "exit_code": None, "error": None, "result": None}
    record.update(fields)
    return record


def ok(**fields):
    return {"ok": True, **fields}


def err(code, message="no"):
    return {"ok": False, "error": {"code": code, "message": message}}


class FakeDaemon:
    """Serves one connection at a time on a temp socket. `respond(request)` returns the
    reply dict, or None to close the connection. Raw request lines go to `.lines`."""

    def __init__(self, respond):
        self.respond = respond
        self._tmp = tempfile.TemporaryDirectory()
        self.path = os.path.join(self._tmp.name, "d.sock")
        self.lines: list[bytes] = []
        self._stop = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def requests(self):
        return [json.loads(line) for line in self.lines]

    def _serve(self):
        while True:
            conn, _ = self._listener.accept()
            if self._stop:
                conn.close()
                return
            with conn, conn.makefile("rb") as rfile:
                for line in rfile:
                    self.lines.append(line.rstrip(b"\n"))
                    reply = self.respond(json.loads(line))
                    if reply is None:
                        break
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self):
        self._stop = True
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:  # unblock accept()
            wake.connect(self.path)
        self._thread.join(DEADLINE)
        self._listener.close()
        self._tmp.cleanup()


class FakeDaemonTest(unittest.TestCase):
    replies = {}  # op -> reply dict or function(request) -> reply

    def respond(self, request):
        reply = self.replies.get(request["op"], err("unknown_op"))
        return reply(request) if callable(reply) else reply

    def setUp(self):
        self.daemon = FakeDaemon(self.respond)
        self.addCleanup(self.daemon.close)

    def run_main(self, *argv, stdin=None):
        """main() with --socket to the fake; returns (exit code, stdout, stderr)."""
        out, errs = io.StringIO(), io.StringIO()
        stdin_patch = mock.patch.object(sys, "stdin", stdin) if stdin else contextlib.nullcontext()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(errs), stdin_patch:
            code = jobctl.main(["--socket", self.daemon.path, *argv])
        return code, out.getvalue(), errs.getvalue()


# --------------------------------------------------------------------------- parsing

class ParseArgsTest(unittest.TestCase):
    def parse(self, *argv):
        with contextlib.redirect_stderr(io.StringIO()):
            return jobctl.parse_args(list(argv))

    def usage_error(self, *argv):
        with self.assertRaises(SystemExit) as cm, contextlib.redirect_stderr(io.StringIO()):
            jobctl.parse_args(list(argv))
        self.assertEqual(cm.exception.code, 2)

    def test_global_options_before_and_after_the_subcommand(self):
        for argv in (["--json", "--socket", "/s", "list"], ["list", "--json", "--socket", "/s"],
                     ["--socket", "/s", "list", "--json"]):
            ns = self.parse(*argv)
            self.assertTrue(ns.json, argv)
            self.assertEqual(ns.socket, "/s", argv)
        ns = self.parse("list")
        self.assertFalse(ns.json)
        self.assertIsNone(ns.socket)

    def test_add_args_and_options_in_any_order(self):
        for argv in (["add", "T", "a", "b", "--priority", "3"], ["add", "T", "--priority", "3", "a", "b"],
                     ["add", "--priority", "3", "T", "a", "b"], ["add", "T", "a", "--priority", "3", "b"]):
            ns = self.parse(*argv)
            self.assertEqual((ns.target, ns.args, ns.fields["priority"]), ("T", ["a", "b"], 3), argv)

    def test_add_dash_dash_passes_args_starting_with_dash(self):
        self.assertEqual(self.parse("add", "examples.jobs:ExampleJob", "--", "-x").args, ["-x"])
        self.assertEqual(self.parse("add", "T", "--retries", "1", "--", "-x", "--json").args, ["-x", "--json"])
        self.assertEqual(self.parse("add", "T", "-2", "-").args, ["-2", "-"])

    def test_add_unknown_option_is_a_usage_error(self):
        self.usage_error("add", "T", "a", "--bogus")
        self.usage_error("add", "T", "--priorty", "1")
        self.usage_error("stats", "extra")

    def test_delay_and_at_are_exclusive(self):
        self.usage_error("add", "T", "--delay", "1", "--at", "2030-01-01T00:00")

    def test_at_is_local_time_without_a_zone(self):
        from datetime import datetime, timezone
        ns = self.parse("add", "T", "--at", "2030-01-02T03:04:05")
        self.assertEqual(ns.fields["run_at"], datetime(2030, 1, 2, 3, 4, 5).timestamp())
        ns = self.parse("add", "T", "--at", "2030-01-02T03:04:05+00:00")
        self.assertEqual(ns.fields["run_at"], datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp())
        self.usage_error("add", "T", "--at", "tomorrow")

    def test_json_args(self):
        ns = self.parse("add", "T", "--json-args", "1", '"s"', '{"k": [null, true]}', "-1.5")
        self.assertEqual(ns.args, [1, "s", {"k": [None, True]}, -1.5])
        self.assertEqual(self.parse("add", "T", "1", '{"k": 1}').args, ["1", '{"k": 1}'])
        self.usage_error("add", "T", "--json-args", "not-json")

    def test_kwargs_must_be_an_object(self):
        self.assertEqual(self.parse("add", "T", "--kwargs", '{"a": 1}').fields["kwargs"], {"a": 1})
        self.usage_error("add", "T", "--kwargs", "[1]")
        self.usage_error("add", "T", "--kwargs", "{")

    def test_timeout_none_is_explicit_null_and_absent_is_omitted(self):
        self.assertIsNone(self.parse("add", "T", "--timeout", "none").fields["timeout"])
        self.assertEqual(self.parse("add", "T", "--timeout", "2.5").fields["timeout"], 2.5)
        self.assertNotIn("timeout", jobctl.add_fields("T", **self.parse("add", "T").fields))
        self.usage_error("add", "T", "--timeout", "soon")
        self.usage_error("add", "T", "--delay", "nan")

    def test_add_requires_target_unless_stdin(self):
        self.usage_error("add")
        self.assertTrue(self.parse("add", "--stdin").stdin)
        self.usage_error("add", "--stdin", "T")
        self.usage_error("add", "--stdin", "--priority", "1")

    def test_ids_are_integers(self):
        self.assertEqual(self.parse("cancel", "1", "2", "3").ids, [1, 2, 3])
        self.usage_error("cancel", "x")
        self.usage_error("wait")

    def test_main_returns_2_on_usage_error_and_0_on_help(self):
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(jobctl.main(["add", "T", "--delay", "1", "--at", "2030-01-01"]), 2)
            self.assertEqual(jobctl.main(["--help"]), 0)


# --------------------------------------------------------------------------- rendering

class RenderTest(unittest.TestCase):
    NOW = 1_800_000_000.0

    def test_relative_time(self):
        rel = lambda dt: jobctl.relative_time(self.NOW + dt, self.NOW)  # noqa: E731
        self.assertEqual(rel(4.2), "in 4s")
        self.assertEqual(rel(0.4), "just now")
        self.assertEqual(rel(-0.9), "just now")
        self.assertEqual(rel(-59), "59s ago")
        self.assertEqual(rel(-120), "2m ago")
        self.assertEqual(rel(-3 * 3600 - 5), "3h ago")
        self.assertEqual(rel(2 * 86400 + 10), "in 2d")

    def test_duration(self):
        self.assertEqual(jobctl.duration(12), "12s")
        self.assertEqual(jobctl.duration(303), "5m 3s")
        self.assertEqual(jobctl.duration(3720), "1h 2m")
        self.assertEqual(jobctl.duration(3 * 86400 + 4 * 3600 + 9), "3d 4h")

    def test_table_is_aligned(self):
        jobs = [job(1, "pending", run_at=self.NOW + 4, retries=3),
                job(12, "running", started_at=self.NOW - 120, attempts=1),
                job(103, "failed", finished_at=self.NOW - 3 * 3600, attempts=2, retries=1,
                    target="examples.jobs:ErrorJob", priority=-5)]
        lines = jobctl.job_table(jobs, self.NOW, width=200).splitlines()
        self.assertEqual(lines[0].split(), ["ID", "STATE", "QUEUE", "PRI", "ATTEMPTS", "TARGET", "AGE",
                                            "TIME", "EXIT", "ERROR"])
        self.assertEqual(lines[1].split()[:6], ["1", "pending", "default", "0", "0/4",
                                                "examples.jobs:ExampleJob"])
        self.assertEqual(lines[1].split()[-4:], ["in", "4s", "-", "-"])
        self.assertEqual(lines[2].split()[-4:], ["2m", "0s", "-", "-"])    # running for 2m
        self.assertEqual(lines[3].split()[:5], ["103", "failed", "default", "-5", "2/2"])
        self.assertEqual(len({line.index("examples") for line in lines[1:]}), 1)  # TARGET column lines up

    def test_record_and_state_line(self):
        text = jobctl.job_record(job(7, "failed", error="RuntimeError: boom", args=["a"], created_at=self.NOW - 5), self.NOW)
        self.assertIn("id: 7\n", text)
        self.assertIn('args: ["a"]', text)
        self.assertIn("key: -", text)
        self.assertRegex(text, r"created_at: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d \(5s ago\)")
        self.assertEqual(jobctl.state_line(job(7, "failed", error="RuntimeError: boom")), "7 failed: RuntimeError: boom")

    def test_worst_exit_code(self):
        self.assertEqual(jobctl.worst([]), 0)
        self.assertEqual(jobctl.worst([0, 1, 4]), 4)
        self.assertEqual(jobctl.worst([4, 2, 1]), 2)
        self.assertEqual(jobctl.worst([2, 3]), 3)


# --------------------------------------------------------------------------- socket path

class SocketPathTest(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name
        env = {k: v for k, v in os.environ.items() if k != "JOBRUNNER_SOCKET"}
        patcher = mock.patch.dict(os.environ, env, clear=True)
        patcher.start()
        self.addCleanup(patcher.stop)

    def at(self, file):
        return mock.patch.object(jobctl, "__file__", file)

    def test_flag_then_env(self):
        with mock.patch.dict(os.environ, {"JOBRUNNER_SOCKET": "/env.sock"}):
            self.assertEqual(jobctl.resolve_socket("/flag.sock"), "/flag.sock")
            self.assertEqual(jobctl.resolve_socket(), "/env.sock")
            self.assertEqual(jobctl.Client().socket_path, "/env.sock")

    def test_storage_next_to_the_real_path_else_run(self):
        real = os.path.join(self.tmp, "checkout")
        os.makedirs(os.path.join(real, "storage"))
        elsewhere = os.path.join(self.tmp, "bin")
        os.mkdir(elsewhere)
        os.symlink(os.path.join(real, "jobctl.py"), os.path.join(elsewhere, "jobctl"))
        with self.at(os.path.join(elsewhere, "jobctl")):
            self.assertEqual(jobctl.resolve_socket(), "/run/jobrunner/jobrunnerd.sock")
            open(os.path.join(real, "storage", "jobrunnerd.sock"), "w").close()
            self.assertEqual(jobctl.resolve_socket(), os.path.join(real, "storage", "jobrunnerd.sock"))

    def test_unreachable_socket_exits_3(self):
        errs = io.StringIO()
        with contextlib.redirect_stderr(errs), contextlib.redirect_stdout(io.StringIO()):
            code = jobctl.main(["--socket", os.path.join(self.tmp, "none.sock"), "stats"])
        self.assertEqual(code, 3)
        self.assertIn("unreachable", errs.getvalue())
        with mock.patch.dict(os.environ, {"JOBRUNNER_SOCKET": os.path.join(self.tmp, "none.sock")}):
            with self.assertRaises(jobctl.DaemonUnreachable) as cm:
                jobctl.Client().hello()
        self.assertEqual(cm.exception.code, "unreachable")


# --------------------------------------------------------------------------- client

class ClientTest(FakeDaemonTest):
    def respond(self, request):
        op = request["op"]
        if op == "get":
            return ok(job=job(request["id"])) if request["id"] < 100 else err("not_found", "no job %d" % request["id"])
        if op == "echo":
            return ok(request=request, pad="x" * request.get("pad", 0))
        if op == "hang":
            return None
        return err("unknown_op", op)

    def test_call_returns_fields_without_ok(self):
        with jobctl.Client(self.daemon.path) as c:
            self.assertEqual(c.call("echo", a=1), {"request": {"op": "echo", "a": 1}, "pad": ""})

    def test_request_framing(self):
        with jobctl.Client(self.daemon.path) as c:
            c.call("echo", text="zé ✓")
        self.assertEqual(self.daemon.lines, ['{"op":"echo","text":"zé ✓"}'.encode("utf-8")])

    def test_pipelined_replies_come_in_request_order(self):
        with jobctl.Client(self.daemon.path, timeout=DEADLINE) as c:
            for i in (3, 1, 404, 2):
                c.send("get", id=i)
            self.assertEqual(c.recv()["job"]["id"], 3)
            self.assertEqual(c.recv()["job"]["id"], 1)
            with self.assertRaises(jobctl.JobrunnerError) as cm:
                c.recv()
            self.assertEqual((cm.exception.code, cm.exception.message), ("not_found", "no job 404"))
            self.assertEqual(c.recv()["job"]["id"], 2)
            self.assertEqual(c.get(5)["id"], 5)  # the connection is still usable
        self.assertEqual([r["id"] for r in self.daemon.requests], [3, 1, 404, 2, 5])

    def test_long_pipeline_with_large_replies_does_not_deadlock(self):
        # ~1.5 MB of requests and 20 MB of replies: more than both socket buffers.
        n = 5000
        with jobctl.Client(self.daemon.path, timeout=DEADLINE) as c:
            for i in range(n):
                c.send("echo", i=i, pad=4000, filler="y" * 300)
            for i in range(n):
                self.assertEqual(c.recv()["request"]["i"], i)

    def test_large_single_reply(self):
        with jobctl.Client(self.daemon.path, timeout=DEADLINE) as c:
            self.assertEqual(len(c.call("echo", pad=3_000_000)["pad"]), 3_000_000)

    def test_error_reply_raises_with_code(self):
        with jobctl.Client(self.daemon.path) as c:
            with self.assertRaises(jobctl.JobrunnerError) as cm:
                c.get(500)
        self.assertEqual(cm.exception.code, "not_found")
        self.assertNotIsInstance(cm.exception, jobctl.DaemonUnreachable)

    def test_closed_connection_is_unreachable_and_next_call_reconnects(self):
        with jobctl.Client(self.daemon.path) as c:
            with self.assertRaises(jobctl.DaemonUnreachable):
                c.call("hang")
            self.assertEqual(c.get(1)["id"], 1)

    def test_call_with_pipelined_replies_pending_is_refused(self):
        with jobctl.Client(self.daemon.path) as c:
            c.send("get", id=1)
            with self.assertRaises(RuntimeError):
                c.get(2)

    def test_unserialisable_request_is_a_client_side_bad_request(self):
        with jobctl.Client(self.daemon.path) as c:
            with self.assertRaises(jobctl.JobrunnerError) as cm:
                c.call("echo", x=object())
        self.assertEqual(cm.exception.code, "bad_request")
        self.assertEqual(self.daemon.lines, [])


class ClientReadTimeoutTest(unittest.TestCase):
    def test_no_reply_within_timeout(self):
        release = threading.Event()
        daemon = FakeDaemon(lambda request: release.wait(DEADLINE) and None)
        self.addCleanup(daemon.close)
        self.addCleanup(release.set)
        with jobctl.Client(daemon.path, timeout=0.05) as c:
            with self.assertRaises(jobctl.DaemonUnreachable) as cm:
                c.hello()
        self.assertEqual(cm.exception.code, "timeout")


class OpMethodsTest(FakeDaemonTest):
    def respond(self, request):
        op = request["op"]
        return {
            "hello": ok(protocol=1, version="1.0"),
            "add": ok(id=7, created=True),
            "add_batch": ok(ids=list(range(1, len(request.get("jobs", [])) + 1))),
            "get": ok(job=job(1)), "cancel": ok(job=job(1, "cancelled")), "retry": ok(job=job(1)),
            "list": ok(jobs=[job(1), job(2)]), "wait": ok(job=job(1, "succeeded"), done=True),
            "output": ok(data="hi", offset=2, eof=True), "stats": ok(counts={}, workers=2, paused=False, uptime=1, protocol=1),
            "pause": ok(paused=True), "resume": ok(paused=False), "prune": ok(removed=3),
        }[op]

    def test_each_op_sends_only_given_fields(self):
        with jobctl.Client(self.daemon.path) as c:
            self.assertEqual(c.hello()["protocol"], 1)
            self.assertEqual(c.add("m:A"), {"id": 7, "created": True})
            c.add("m:A", method="run", args=[1], kwargs={"k": 2}, priority=5, delay=1.5, retries=2,
                  retry_delay=0.5, backoff="fixed", timeout=None, key="k1")
            self.assertEqual(c.add_batch([{"target": "m:A"}, {"target": "m:B"}]), [1, 2])
            self.assertEqual(c.get(1)["id"], 1)
            self.assertEqual(len(c.list(state="pending", limit=5)), 2)
            self.assertEqual(c.cancel(1)["state"], "cancelled")
            self.assertEqual(c.retry(1)["state"], "pending")
            self.assertTrue(c.wait(1, timeout=2)["done"])
            c.wait(1)
            self.assertEqual(c.output(1, offset=5), {"data": "hi", "offset": 2, "eof": True})
            self.assertEqual(c.stats()["workers"], 2)
            self.assertTrue(c.pause())
            self.assertFalse(c.resume())
            self.assertEqual(c.prune(older_than=60), 3)
            c.prune()
        self.assertEqual(self.daemon.requests, [
            {"op": "hello"},
            {"op": "add", "target": "m:A"},
            {"op": "add", "target": "m:A", "method": "run", "args": [1], "kwargs": {"k": 2}, "priority": 5,
             "delay": 1.5, "retries": 2, "retry_delay": 0.5, "backoff": "fixed", "key": "k1", "timeout": None},
            {"op": "add_batch", "jobs": [{"target": "m:A"}, {"target": "m:B"}]},
            {"op": "get", "id": 1},
            {"op": "list", "state": "pending", "limit": 5},
            {"op": "cancel", "id": 1}, {"op": "retry", "id": 1},
            {"op": "wait", "id": 1, "timeout": 2}, {"op": "wait", "id": 1, "timeout": jobctl._WAIT_SLICE},
            {"op": "output", "id": 1, "offset": 5},
            {"op": "stats"}, {"op": "pause"}, {"op": "resume"},
            {"op": "prune", "older_than": 60}, {"op": "prune"},
        ])

    def test_run_background_job_like_php(self):
        job_id = jobctl.run_background_job(example_jobs.ExampleJob, "handle", 1, 0, 3, "param1", "param2",
                                           socket_path=self.daemon.path)
        self.assertEqual(job_id, 7)
        jobctl.run_background_job("examples.jobs:ErrorJob", "handle", 2, 5, 2, socket_path=self.daemon.path)
        jobctl.run_background_job(example_jobs.add, "handle", 0, 0, 0, 1, 2, socket_path=self.daemon.path)
        jobctl.run_background_job(example_jobs.Outer.Inner, socket_path=self.daemon.path)
        self.assertEqual(self.daemon.requests, [
            {"op": "add", "target": "examples.jobs:ExampleJob", "method": "handle", "args": ["param1", "param2"],
             "priority": 1, "delay": 0, "retries": 3},
            {"op": "add", "target": "examples.jobs:ErrorJob", "method": "handle", "args": [],
             "priority": 2, "delay": 5, "retries": 2},
            {"op": "add", "target": "examples.jobs:add", "args": [1, 2], "priority": 0, "delay": 0, "retries": 0},
            {"op": "add", "target": "examples.jobs:Outer.Inner", "method": "handle", "args": [],
             "priority": 0, "delay": 0, "retries": 0},
        ])

    def test_run_background_job_refuses_unimportable_targets(self):
        class Local:
            def handle(self):
                pass
        with self.assertRaises(ValueError):
            jobctl.run_background_job(Local, socket_path=self.daemon.path)
        self.assertEqual(self.daemon.lines, [])


# --------------------------------------------------------------------------- CLI

class CliTest(FakeDaemonTest):
    def setUp(self):
        self.replies = {}
        super().setUp()

    def test_add_prints_the_id_and_sends_verbatim_args(self):
        self.replies["add"] = ok(id=42, created=True)
        code, out, errs = self.run_main("add", "examples.jobs:echo", "a b", "-x")  # an option before "--"
        self.assertEqual((code, out), (2, ""))
        self.assertIn("unrecognized arguments: -x", errs)
        code, out, _ = self.run_main("add", "examples.jobs:echo", "a b", "--priority", "3", "--", "-x", "ü")
        self.assertEqual((code, out), (0, "42\n"))
        self.assertEqual(self.daemon.requests[-1], {"op": "add", "target": "examples.jobs:echo",
                                                    "args": ["a b", "-x", "ü"], "priority": 3})

    def test_add_json_before_or_after(self):
        self.replies["add"] = ok(id=42, created=False)
        for argv in (["--json", "add", "T", "--timeout", "none"], ["add", "T", "--timeout", "none", "--json"]):
            code, out, _ = self.run_main(*argv)
            self.assertEqual(code, 0)
            self.assertEqual(json.loads(out), {"id": 42, "created": False})
        self.assertEqual(self.daemon.requests[-1], {"op": "add", "target": "T", "args": [], "timeout": None})

    def test_add_wait_exits_1_when_the_job_failed(self):
        self.replies["add"] = ok(id=9, created=True)
        self.replies["wait"] = ok(job=job(9, "failed", error="RuntimeError: boom"), done=True)
        code, out, _ = self.run_main("add", "examples.jobs:ErrorJob", "--wait")
        self.assertEqual((code, out), (1, "9\n9 failed: RuntimeError: boom\n"))
        self.assertEqual(self.daemon.requests[-1], {"op": "wait", "id": 9, "timeout": jobctl._WAIT_SLICE})

    def test_refused_request_exits_2_with_message(self):
        self.replies["add"] = err("not_allowed", "target os:system is not allowed")
        code, out, errs = self.run_main("add", "os:system", "true")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("jobctl: error: not_allowed: target os:system is not allowed", errs)

    def test_cancel_several_ids_reports_each_and_exits_with_the_worst(self):
        self.replies["cancel"] = lambda r: err("not_found", "no job 2") if r["id"] == 2 else ok(job=job(r["id"], "cancelled"))
        code, out, errs = self.run_main("cancel", "1", "2", "3")
        self.assertEqual((code, out), (2, "1 cancelled\n3 cancelled\n"))
        self.assertIn("2: not_found: no job 2", errs)
        code, out, _ = self.run_main("--json", "cancel", "1", "2")
        docs = json.loads(out)
        self.assertEqual([d.get("job", {}).get("state") for d in docs], ["cancelled", None])
        self.assertEqual(docs[1]["error"]["code"], "not_found")
        code, out, _ = self.run_main("--json", "cancel", "3")
        self.assertEqual((code, json.loads(out)["job"]["id"]), (0, 3))

    def test_wait_exit_codes_and_shared_deadline(self):
        states = {1: ("succeeded", True), 2: ("failed", True), 3: ("running", False)}
        self.replies["wait"] = lambda r: ok(job=job(r["id"], states[r["id"]][0]), done=states[r["id"]][1])
        self.assertEqual(self.run_main("wait", "1")[:2], (0, "1 succeeded\n"))
        self.assertEqual(self.run_main("wait", "1", "2")[0], 1)
        code, out, _ = self.run_main("wait", "1", "2", "3", "--timeout", "5")
        self.assertEqual(code, 4)
        self.assertIn("3 running (not finished)", out)
        timeouts = [r["timeout"] for r in self.daemon.requests[-3:]]
        self.assertTrue(all(0 <= t <= 5 for t in timeouts), timeouts)
        self.assertEqual(timeouts, sorted(timeouts, reverse=True))  # one deadline for all ids

    def test_logs_pages_until_eof(self):
        chunks = {0: ("hello ", 6, False), 6: ("wörld\n", 13, True)}
        self.replies["output"] = lambda r: ok(data=chunks[r["offset"]][0], offset=chunks[r["offset"]][1],
                                              eof=chunks[r["offset"]][2])
        self.assertEqual(self.run_main("logs", "4")[:2], (0, "hello wörld\n"))
        code, out, _ = self.run_main("logs", "4", "--json")
        self.assertEqual(json.loads(out), {"data": "hello wörld\n", "offset": 13, "eof": True})

    def test_logs_stops_at_an_empty_chunk_unless_following(self):
        done = {"flag": False}
        def output(r):
            if r["offset"] == 0:
                return ok(data="a", offset=1, eof=False)
            return ok(data="b", offset=2, eof=True) if done["flag"] else ok(data="", offset=1, eof=False)
        def wait(r):
            done["flag"] = True  # the job ends during the follow
            return ok(job=job(r["id"], "succeeded"), done=True)
        self.replies.update(output=output, wait=wait)
        self.assertEqual(self.run_main("logs", "4")[:2], (0, "a"))
        self.assertEqual(self.run_main("logs", "4", "--follow")[:2], (0, "ab"))
        self.assertIn({"op": "wait", "id": 4, "timeout": jobctl._FOLLOW_POLL}, self.daemon.requests)

    def test_list_show_stats(self):
        self.replies["list"] = ok(jobs=[job(1), job(2, "running", started_at=time.time())])
        code, out, _ = self.run_main("list", "--state", "pending", "--target", "examples.*", "--limit", "2")
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines()[0].split()[:6], ["ID", "STATE", "QUEUE", "PRI", "ATTEMPTS", "TARGET"])
        self.assertEqual(self.daemon.requests[-1], {"op": "list", "state": "pending", "target": "examples.*", "limit": 2,
                                                    "order": "desc"})
        self.assertEqual(len(json.loads(self.run_main("list", "--json")[1])), 2)
        self.replies["get"] = ok(job=job(1))
        self.assertIn("state: pending", self.run_main("show", "1")[1])
        self.replies["stats"] = ok(counts={"pending": 2, "running": 1, "succeeded": 0, "failed": 0, "cancelled": 0},
                                   workers=4, paused=True, uptime=3720.5, protocol=1)
        out = self.run_main("stats")[1]
        for line in ("pending: 2", "workers: 4", "paused: yes", "uptime: 1h 2m"):
            self.assertIn(line, out.splitlines())

    def test_add_stdin_sends_one_batch(self):
        self.replies["add_batch"] = lambda r: ok(ids=[10 + i for i in range(len(r["jobs"]))])
        lines = [{"target": "examples.jobs:add", "args": [i, 1]} for i in range(3)]
        stdin = io.TextIOWrapper(io.BytesIO(("\n".join(json.dumps(j) for j in lines) + "\n\n").encode()))
        code, out, _ = self.run_main("add", "--stdin", stdin=stdin)
        self.assertEqual((code, out), (0, "10\n11\n12\n"))
        self.assertEqual(self.daemon.requests, [{"op": "add_batch", "jobs": lines}])
        stdin = io.TextIOWrapper(io.BytesIO(b'{"target": "x:y"}\nnot json\n'))
        self.assertEqual(self.run_main("add", "--stdin", stdin=stdin)[0], 2)
        self.assertEqual(len(self.daemon.requests), 1)  # nothing sent for bad input


class OnlyTheNamedSubparserTest(unittest.TestCase):
    """parse_args builds only the subparser argv names (a faster `jobctl add`); argv that
    does not plainly name one gets the whole parser, so argparse's own rules still apply."""

    def test_the_command_is_found_past_the_global_options(self):
        for argv, expected in ((["add", "t:x"], "add"),
                               (["--socket", "/s", "--json", "list"], "list"),
                               (["--socket=/s", "stats"], "stats"),
                               (["--json", "--socket", "list", "show", "1"], "show"),
                               (["--sock", "/s", "add"], None), (["nonsense"], None), ([], None),
                               (["--help"], None), (["-h", "add"], None)):
            self.assertEqual(jobctl.command_in(argv), expected, argv)

    def test_what_is_not_plainly_named_still_parses_as_before(self):
        ns = jobctl.parse_args(["--sock", "/s", "add", "examples.jobs:add", "1"])    # abbreviated
        self.assertEqual((ns.command, ns.socket, ns.target, ns.args),
                         ("add", "/s", "examples.jobs:add", ["1"]))
        with contextlib.redirect_stderr(io.StringIO()) as err, self.assertRaises(SystemExit):
            jobctl.parse_args(["nonsense"])
        self.assertIn("invalid choice: 'nonsense'", err.getvalue())
        for name in jobctl.COMMANDS:                     # each command's parser, alone or not
            only, full = jobctl.build_parser(name), jobctl.build_parser()
            self.assertEqual(only.commands[name].format_help(), full.commands[name].format_help())
            self.assertEqual(list(only.commands), [name])


if __name__ == "__main__":
    unittest.main()
