"""jobctl against a real daemon (SPEC §4): the commands, their output, --json, exit codes, socket
selection, argument passing, and the Python helper run_background_job().

Most tests run `jobctl.py` as a subprocess (`self.daemon.jobctl(...)`, which adds --socket); some
call `jobctl.main([...])` in this process. No fixed sleeps: jobs are awaited with the daemon's
`wait` op, and jobs that must not run are delayed far into the future.
"""
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import unittest
from datetime import datetime, timedelta, timezone

from tests.support import JOBCTL, DaemonTestCase

import jobctl  # noqa: E402  (tests.support puts the project root on sys.path)

LATER = "3600"          # --delay that keeps a job pending for the whole test


class CliCase(DaemonTestCase):

    def ctl(self, *args, code=0, **kw):
        """Run jobctl (subprocess) and check its exit code; returns the CompletedProcess."""
        proc = self.daemon.jobctl(*args, **kw)
        self.assertEqual(proc.returncode, code, "jobctl %s: exit %d\nstdout: %s\nstderr: %s"
                         % (" ".join(args), proc.returncode, proc.stdout, proc.stderr))
        return proc

    def ctl_json(self, *args, code=0):
        """jobctl --json ...: stdout must be exactly one JSON document."""
        proc = self.ctl("--json", *args, code=code)
        try:
            return json.loads(proc.stdout)
        except ValueError as exc:
            self.fail("jobctl --json %s: stdout is not one JSON document (%s): %r"
                      % (" ".join(args), exc, proc.stdout))

    def main(self, *args):
        """jobctl.main() in this process: (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = jobctl.main(["--socket", self.daemon.socket, *args])
        return code, out.getvalue(), err.getvalue()

    def add_id(self, *args):
        proc = self.ctl("add", *args)
        self.assertRegex(proc.stdout, r"\A\d+\n\Z")
        return int(proc.stdout)

    def jobs(self):
        return self.daemon.call(op="list")["jobs"]


####################################################################################################
#  add
####################################################################################################

class AddTest(CliCase):

    def test_add_prints_the_id(self):
        proc = self.ctl("add", "examples.jobs:ExampleJob", "a", "b c")
        self.assertEqual(proc.stdout, "1\n")
        job = self.daemon.get(1)
        self.assertEqual((job["target"], job["args"]), ("examples.jobs:ExampleJob", ["a", "b c"]))
        self.assertEqual(self.add_id("examples.jobs:ExampleJob"), 2)

    def test_add_json_prints_one_object(self):
        reply = self.ctl_json("add", "examples.jobs:echo", "x", "--delay", LATER, "--priority", "5",
                              "--key", "k1")
        self.assertEqual(reply, {"id": 1, "created": True})
        again = self.ctl_json("add", "examples.jobs:echo", "y", "--key", "k1")
        self.assertEqual(again, {"id": 1, "created": False})
        job = self.daemon.get(1)
        self.assertEqual((job["priority"], job["key"], job["args"]), (5, "k1", ["x"]))

    def test_add_options_reach_the_job(self):
        job_id = self.add_id("examples.jobs:echo", "--delay", LATER, "--retries", "3",
                             "--retry-delay", "2.5", "--backoff", "fixed", "--timeout", "9",
                             "--kwargs", '{"k": [1, null]}')
        job = self.daemon.get(job_id)
        self.assertEqual((job["retries"], job["retry_delay"], job["backoff"], job["timeout"],
                          job["kwargs"]), (3, 2.5, "fixed", 9.0, {"k": [1, None]}))
        self.assertAlmostEqual(job["run_at"] - job["created_at"], 3600, delta=5)
        no_limit = self.daemon.get(self.add_id("examples.jobs:echo", "--delay", LATER,
                                               "--timeout", "none"))
        self.assertIsNone(no_limit["timeout"])
        method = self.daemon.get(self.add_id("examples.jobs:Outer.Inner", "--method", "handle",
                                             "--delay", LATER))
        self.assertEqual(method["method"], "handle")

    def test_add_wait_exit_codes(self):
        proc = self.ctl("add", "--wait", "examples.jobs:ExampleJob", "w")
        self.assertEqual(proc.stdout.split()[0], "1")
        self.assertIn("succeeded", proc.stdout)
        proc = self.ctl("add", "--wait", "examples.jobs:ErrorJob", code=1)
        self.assertIn("failed", proc.stdout)
        self.assertEqual(self.daemon.get(2)["state"], "failed")
        doc = self.ctl_json("add", "--wait", "examples.jobs:ExampleJob", "j")
        self.assertEqual(doc["id"], 3)
        self.assertEqual(doc["job"]["state"], "succeeded")

    def test_json_args_are_parsed(self):
        job_id = self.add_id("--json-args", "examples.jobs:echo", "1", '"x"', '{"a": [1, null]}',
                             "true")
        job = self.daemon.wait_job(job_id)
        self.assertEqual(job["state"], "succeeded", job)
        self.assertEqual(job["args"], [1, "x", {"a": [1, None]}, True])
        received = job["result"]["args"]
        self.assertEqual(received, [1, "x", {"a": [1, None]}, True])
        self.assertIs(type(received[0]), int)
        plain = self.daemon.wait_job(self.add_id("examples.jobs:echo", "1", "true"))
        self.assertEqual(plain["result"]["args"], ["1", "true"])
        self.ctl("add", "--json-args", "examples.jobs:echo", "{not json", code=2)

    def test_dash_args_after_double_dash_reach_the_job(self):
        args = ["-x", "--priority", "-1", "-", "--json", "--socket", "--wait"]
        job_id = self.add_id("examples.jobs:echo", "--", *args)
        job = self.daemon.wait_job(job_id)
        self.assertEqual(job["priority"], 0)
        self.assertEqual(job["args"], args)
        self.assertEqual(job["result"]["args"], args)

    def test_double_dash_after_the_separator_is_an_arg(self):
        # Only the first "--" ends the options; a later one is an ARG like any other.
        for args in (["a", "--"], ["--"], ["-x", "--", "b"]):
            with self.subTest(args=args):
                job = self.daemon.get(self.add_id("examples.jobs:echo", "--delay", LATER,
                                                  "--", *args))
                self.assertEqual(job["args"], args)
                job = self.daemon.get(self.add_id("examples.jobs:echo", "--", *args))
                self.assertEqual(job["args"], args)

    def test_at_sets_run_at(self):
        at = time.time() + 1
        job_id = self.add_id("examples.jobs:echo", "--at",
                             datetime.fromtimestamp(at, timezone.utc).isoformat())
        job = self.daemon.get(job_id)
        self.assertAlmostEqual(job["run_at"], at, delta=0.001)
        job = self.daemon.wait_job(job_id)
        self.assertEqual(job["state"], "succeeded")
        self.assertGreaterEqual(job["started_at"], job["run_at"])

    def test_at_without_zone_is_local_time(self):
        at = time.time() + 1
        # local time UTC+05:30 through a POSIX TZ rule (needs no zoneinfo files)
        local = (datetime.fromtimestamp(at, timezone.utc) + timedelta(hours=5, minutes=30))
        env = dict(os.environ, TZ="JRT-05:30")
        proc = subprocess.run([sys.executable, JOBCTL, "--socket", self.daemon.socket, "add",
                               "examples.jobs:echo", "--at", local.replace(tzinfo=None).isoformat()],
                              capture_output=True, text=True, env=env, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        job = self.daemon.get(int(proc.stdout))
        self.assertAlmostEqual(job["run_at"], at, delta=0.001)
        self.assertEqual(self.daemon.wait_job(job["id"])["state"], "succeeded")


####################################################################################################
#  Exit codes and errors
####################################################################################################

class AddStdinTest(CliCase):

    def test_thousands_of_jobs_go_in_batches_by_count_and_by_bytes(self):
        # 2,500 small jobs (batches of 1000), then 600 of ~2.5 KB: 1.5 MB, more than one request
        # may carry (max_request_bytes, 1 MiB), so only the byte limit keeps this working.
        big = "x" * 2500
        lines = [{"target": "examples.jobs:echo", "args": [i], "delay": 3600} for i in range(2500)]
        lines += [{"target": "examples.jobs:echo", "args": [big, i], "delay": 3600}
                  for i in range(600)]
        text = "".join(json.dumps(job) + "\n" for job in lines) + "\n"    # a blank line: skipped
        proc = self.ctl("add", "--stdin", input=text, timeout=120)
        self.assertEqual([int(x) for x in proc.stdout.split()], list(range(1, 3101)))
        self.assertEqual(self.daemon.call(op="stats")["counts"]["pending"], 3100)
        self.assertEqual(self.daemon.get(2500)["args"], [2499])
        self.assertEqual(self.daemon.get(3100)["args"], [big, 599])

    def test_a_bad_line_adds_nothing(self):
        text = json.dumps({"target": "examples.jobs:echo"}) + "\n" + "not json\n"
        proc = self.ctl("add", "--stdin", input=text, code=2)
        self.assertIn("stdin line 2", proc.stderr)
        self.assertEqual(self.daemon.call(op="stats")["counts"]["pending"], 0)


class ExitCodeTest(CliCase):

    def test_usage_errors_exit_2(self):
        at = datetime.fromtimestamp(time.time() + 60).isoformat()
        for args in (("frobnicate",), ("list", "--bogus"), ("--bogus", "stats"),
                     ("add", "examples.jobs:echo", "--delay", "1", "--at", at),
                     ("add",), ("show", "one"), ("wait",), ("add", "examples.jobs:echo",
                                                            "--priority", "high")):
            with self.subTest(args=args):
                proc = self.ctl(*args, code=2)
                self.assertTrue(proc.stderr.strip())
                self.assertEqual(proc.stdout, "")
        self.assertEqual(self.jobs(), [], "a usage error added a job")

    def test_refused_request_exits_2_with_the_message_on_stderr(self):
        proc = self.ctl("add", "os:system", "true", code=2)
        self.assertIn("not_allowed", proc.stderr)
        self.assertEqual(proc.stdout, "")
        self.assertEqual(self.jobs(), [])
        proc = self.ctl("show", "999", code=2)
        self.assertIn("not_found", proc.stderr)
        self.assertEqual(proc.stdout, "")
        code, out, err = self.main("cancel", "999")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("not_found", err)

    def test_the_jobctl_command_is_jobctl_py(self):
        # `jobctl` (the launcher that reuses jobctl.py's cached bytecode) behaves exactly like
        # `jobctl.py`, also through a symlink (the default socket is found beside the real file).
        command = os.path.join(os.path.dirname(JOBCTL), "jobctl")
        link = os.path.join(self.root, "bin-jobctl")
        os.symlink(command, link)
        for path in (command, link):
            with self.subTest(path=path):
                proc = subprocess.run([sys.executable, path, "--socket", self.daemon.socket,
                                       "add", "examples.jobs:echo", "x"],
                                      capture_output=True, text=True, timeout=60)
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertEqual(self.daemon.get(int(proc.stdout))["args"], ["x"])
                proc = subprocess.run([sys.executable, path, "--socket", self.daemon.socket,
                                       "show", "999"], capture_output=True, text=True, timeout=60)
                self.assertEqual(proc.returncode, 2, proc.stderr)
                env = dict(os.environ)
                env.pop("JOBRUNNER_SOCKET", None)
                proc = subprocess.run([sys.executable, path, "--json", "stats"], env=env,
                                      cwd=self.root, capture_output=True, text=True, timeout=60)
                self.assertIn(proc.returncode, (0, 3))      # whatever jobctl.py itself says
                same = subprocess.run([sys.executable, JOBCTL, "--json", "stats"], env=env,
                                      cwd=self.root, capture_output=True, text=True, timeout=60)
                self.assertEqual(proc.returncode, same.returncode)
                if same.returncode == 3:            # the message names the socket it tried
                    self.assertEqual(proc.stderr, same.stderr)

    def test_unreachable_daemon_exits_3(self):
        missing = os.path.join(self.root, "nobody.sock")
        proc = subprocess.run([sys.executable, JOBCTL, "--socket", missing, "stats"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 3, proc.stderr)
        self.assertTrue(proc.stderr.strip())
        stale = os.path.join(self.root, "stale.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(stale)
        s.close()
        code, out, err = jobctl_main("--socket", stale, "add", "examples.jobs:echo")
        self.assertEqual(code, 3, err)

    def test_wait_exit_codes(self):
        pending = self.add_id("examples.jobs:echo", "--delay", LATER)
        started = time.monotonic()
        proc = self.ctl("wait", str(pending), "--timeout", "0.5", code=4)
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        self.assertIn(str(pending), proc.stdout)
        self.assertEqual(self.daemon.get(pending)["state"], "pending")

        good = self.add_id("examples.jobs:ExampleJob")
        bad = self.add_id("examples.jobs:ErrorJob")
        self.ctl("wait", str(good))
        self.ctl("wait", str(bad), code=1)
        self.ctl("cancel", str(pending))
        self.ctl("wait", str(pending), code=1)
        self.ctl("wait", str(good), str(bad), code=1)
        doc = self.ctl_json("wait", str(good))
        self.assertTrue(doc["done"])
        self.assertEqual(doc["job"]["state"], "succeeded")


####################################################################################################
#  The other commands
####################################################################################################

class CommandsTest(CliCase):

    def test_list(self):
        a = self.add_id("examples.jobs:echo", "--delay", LATER)
        b = self.add_id("examples.jobs:ErrorJob")
        c = self.add_id("examples.jobs:ExampleJob", "--delay", LATER)
        self.daemon.wait_job(b)
        text = self.ctl("list").stdout
        for job_id, state in ((a, "pending"), (b, "failed"), (c, "pending")):
            line = [ln for ln in text.splitlines() if ln.split()[:1] == [str(job_id)]]
            self.assertEqual(len(line), 1, text)
            self.assertIn(state, line[0])
        listed = self.ctl_json("list")
        self.assertEqual([j["id"] for j in listed], [a, b, c])
        self.assertEqual(listed[1], self.daemon.get(b))
        self.assertEqual([j["id"] for j in self.ctl_json("list", "--state", "pending")], [a, c])
        self.assertEqual([j["id"] for j in self.ctl_json("list", "--target", "examples.jobs:E*")],
                         [b, c])
        self.assertEqual([j["id"] for j in self.ctl_json("list", "--limit", "2")], [b, c])   # the newest
        self.assertEqual(self.ctl_json("list", "--state", "running"), [])

    def test_show(self):
        job_id = self.add_id("examples.jobs:echo", "arg-1", "--delay", LATER, "--priority", "3")
        text = self.ctl("show", str(job_id)).stdout
        self.assertIn("examples.jobs:echo", text)
        self.assertIn("pending", text)
        self.assertIn("arg-1", text)
        self.assertEqual(self.ctl_json("show", str(job_id)), self.daemon.get(job_id))

    def test_stats(self):
        self.add_id("examples.jobs:echo", "--delay", LATER)
        self.daemon.wait_job(self.add_id("examples.jobs:ExampleJob"))
        self.assertIn("pending", self.ctl("stats").stdout)
        stats = self.ctl_json("stats")
        self.assertEqual(stats["counts"], {"blocked": 0, "pending": 1, "running": 0,
                                           "succeeded": 1, "failed": 0, "cancelled": 0})
        self.assertEqual((stats["workers"], stats["paused"], stats["protocol"]), (2, False, 1))

    def test_cancel_and_retry(self):
        self.ctl("pause")                       # retried jobs stay pending until resume
        a = self.add_id("examples.jobs:echo", "--delay", LATER)
        b = self.add_id("examples.jobs:echo", "--delay", LATER)
        self.ctl("cancel", str(a))
        self.assertEqual(self.daemon.get(a)["state"], "cancelled")
        proc = self.ctl("cancel", str(a), code=2)               # not live any more
        self.assertIn("invalid_state", proc.stderr)
        doc = self.ctl_json("cancel", str(b))
        self.assertEqual(doc["job"]["state"], "cancelled")

        doc = self.ctl_json("retry", str(a))
        self.assertEqual(doc["job"]["state"], "pending")
        self.assertEqual(doc["job"]["attempts"], 0)
        self.ctl("retry", str(b))
        self.assertEqual(self.daemon.get(b)["state"], "pending")
        self.ctl("retry", str(b), code=2)                       # pending: nothing to retry
        self.ctl("cancel", str(a), str(b))
        self.assertEqual([self.daemon.get(i)["state"] for i in (a, b)], ["cancelled"] * 2)
        self.ctl("retry", str(a), "999", code=2)                # one refused: exit 2
        self.assertEqual(self.daemon.get(a)["state"], "pending")

        self.ctl("resume")
        self.assertEqual(self.daemon.wait_job(a)["state"], "succeeded")
        failed = self.add_id("examples.jobs:ErrorJob")
        self.assertEqual(self.daemon.wait_job(failed)["state"], "failed")
        self.ctl("retry", str(failed))
        job = self.daemon.wait_job(failed)
        self.assertEqual((job["state"], job["attempts"]), ("failed", 1))

    def test_logs_prints_the_output(self):
        job_id = self.add_id("examples.jobs:ExampleJob", "log-marker", "ünï")
        self.daemon.wait_job(job_id)
        proc = self.ctl("logs", str(job_id))
        self.assertIn('ExampleJob: params ["log-marker", "\\u00fcn\\u00ef"]', proc.stdout)
        doc = self.ctl_json("logs", str(job_id))
        self.assertIn("log-marker", doc["data"])
        proc = self.ctl("logs", "--follow", str(job_id))
        self.assertIn("log-marker", proc.stdout)
        self.ctl("logs", "999", code=2)

    def test_pause_and_resume(self):
        self.ctl("pause")
        self.assertTrue(self.daemon.call(op="stats")["paused"])
        job_id = self.add_id("examples.jobs:ExampleJob")
        self.ctl("wait", str(job_id), "--timeout", "0.3", code=4)
        self.assertEqual(self.daemon.get(job_id)["state"], "pending")
        self.assertEqual(self.ctl_json("stats")["paused"], True)
        self.assertEqual(self.ctl_json("resume"), {"paused": False})
        self.assertFalse(self.daemon.call(op="stats")["paused"])
        self.assertEqual(self.daemon.wait_job(job_id)["state"], "succeeded")
        self.assertEqual(self.ctl_json("pause"), {"paused": True})
        code, out, err = self.main("resume")
        self.assertEqual(code, 0, err)
        self.assertFalse(self.daemon.call(op="stats")["paused"])

    def test_prune(self):
        done = self.add_id("examples.jobs:ExampleJob")
        waiting = self.add_id("examples.jobs:echo", "--delay", LATER)
        self.daemon.wait_job(done)
        self.assertEqual(self.ctl_json("prune", "--older-than", "3600"), {"removed": 0})
        self.assertEqual(self.daemon.get(done)["state"], "succeeded")
        self.ctl("prune")
        self.assertEqual(self.daemon.call(op="get", id=done)["error"]["code"], "not_found")
        self.assertEqual(self.daemon.get(waiting)["state"], "pending")
        self.daemon.wait_job(self.add_id("examples.jobs:ExampleJob"))
        self.assertEqual(self.ctl_json("prune"), {"removed": 1})

    def test_every_json_output_is_one_document(self):
        job_id = self.add_id("examples.jobs:ExampleJob", "doc")
        self.daemon.wait_job(job_id)
        other = self.add_id("examples.jobs:echo", "--delay", LATER)
        for args in (("list",), ("show", str(job_id)), ("stats",), ("wait", str(job_id)),
                     ("wait", str(job_id), str(job_id)), ("logs", str(job_id)),
                     ("cancel", str(other)), ("retry", str(other)), ("pause",), ("resume",),
                     ("add", "examples.jobs:echo", "--delay", LATER), ("prune",)):
            with self.subTest(args=args):
                self.ctl_json(*args)
        # --json also after the command
        self.assertEqual(json.loads(self.ctl("stats", "--json").stdout)["protocol"], 1)


####################################################################################################
#  Socket selection and the Python API
####################################################################################################

def jobctl_main(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = jobctl.main(list(args))
    return code, out.getvalue(), err.getvalue()


class SocketAndApiTest(CliCase):

    def run_without_socket_flag(self, *args, env_socket):
        env = {k: v for k, v in os.environ.items() if k != "JOBRUNNER_SOCKET"}
        env["JOBRUNNER_SOCKET"] = env_socket
        return subprocess.run([sys.executable, JOBCTL, *args], capture_output=True, text=True,
                              env=env, timeout=60, cwd=self.root)

    def test_socket_from_environment(self):
        proc = self.run_without_socket_flag("add", "examples.jobs:echo",
                                            env_socket=self.daemon.socket)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout, "1\n")
        self.assertEqual(self.daemon.get(1)["target"], "examples.jobs:echo")

    def test_socket_flag_beats_environment(self):
        nobody = os.path.join(self.root, "nobody.sock")
        proc = self.run_without_socket_flag("--socket", self.daemon.socket, "stats", "--json",
                                            env_socket=nobody)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(json.loads(proc.stdout)["protocol"], 1)
        proc = self.run_without_socket_flag("--socket", nobody, "stats",
                                            env_socket=self.daemon.socket)
        self.assertEqual(proc.returncode, 3, proc.stderr)

    def test_main_in_process(self):
        code, out, err = self.main("add", "examples.jobs:ExampleJob", "in-process")
        self.assertEqual((code, out), (0, "1\n"), err)
        code, out, err = self.main("--json", "wait", "1")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["job"]["result"], {"params": ["in-process"]})
        code, out, err = self.main("frobnicate")
        self.assertEqual(code, 2)

    def test_run_background_job_with_target_string(self):
        job_id = jobctl.run_background_job("examples.jobs:ExampleJob", "handle", 1, 0, 3,
                                           "param1", "param2", socket_path=self.daemon.socket)
        self.assertIsInstance(job_id, int)
        job = self.daemon.get(job_id)
        self.assertEqual((job["target"], job["method"], job["priority"], job["retries"],
                          job["args"]),
                         ("examples.jobs:ExampleJob", "handle", 1, 3, ["param1", "param2"]))
        job = self.daemon.wait_job(job_id)
        self.assertEqual(job["state"], "succeeded")
        self.assertEqual(job["result"], {"params": ["param1", "param2"]})

    def test_run_background_job_with_class_and_delay(self):
        from examples.jobs import ExampleJob
        job_id = jobctl.run_background_job(ExampleJob, "handle", 2, 600, 0, "p",
                                           socket_path=self.daemon.socket)
        job = self.daemon.get(job_id)
        self.assertEqual((job["target"], job["method"], job["priority"], job["retries"],
                          job["args"], job["state"]),
                         ("examples.jobs:ExampleJob", "handle", 2, 0, ["p"], "pending"))
        self.assertAlmostEqual(job["run_at"] - job["created_at"], 600, delta=5)
        now = jobctl.run_background_job(ExampleJob, "handle", 0, 0, 0, "q",
                                        socket_path=self.daemon.socket)
        self.assertEqual(self.daemon.wait_job(now)["result"], {"params": ["q"]})

    def test_client_context_manager(self):
        with jobctl.Client(self.daemon.socket) as c:
            job_id = c.add("examples.jobs:add", args=[2, 3])["id"]
            reply = c.wait(job_id, timeout=30)
        self.assertTrue(reply["done"])
        self.assertEqual(reply["job"]["result"], 5)


if __name__ == "__main__":
    unittest.main()
