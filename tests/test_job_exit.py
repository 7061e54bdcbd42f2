"""How a job process ends is the same however it was made (spawned, forked by the zygote, a
spare, a reused worker): sys.exit() with an int (also one past a C long), with None and with a
message, and the atexit functions a job registered run into its output before the process
goes, as at an interpreter's exit. The zygote's child and the worker end through the same
job-process code (_exit_status(), _exit()); these tests hold every mode to one behaviour."""
import os
import unittest

from tests import support

EXIT_JOBS = """
import atexit, sys

def code(n):
    print("before exit", flush=True)
    sys.exit(n)

def huge(sign):
    raise SystemExit(sign * 2 ** 100)       # past a C long: the interpreter exits 255

def message():
    sys.exit("a message from the job")

def with_atexit():
    atexit.register(print, "atexit ran")
    return "returned"

def atexit_then_exit():
    atexit.register(print, "atexit ran before the end")
    sys.exit(4)
"""


class JobExitZygote(support.DaemonTestCase):
    config = {"allow": ["examples.*:*", "xjobs:*"], "start_method": "zygote"}

    def prepare(self):
        self.write_job_module("xjobs", EXIT_JOBS)

    def output(self, job_id):
        return support.job_output(self.daemon.call(op="output", id=job_id)["data"])

    def end(self, target, *args):
        job = self.daemon.wait_job(self.daemon.add(target, args=list(args)))
        return job, self.output(job["id"])

    def test_sys_exit_with_a_code_fails_with_that_code(self):
        job, out = self.end("xjobs:code", 3)
        self.assertEqual((job["state"], job["exit_code"]), ("failed", 3))
        self.assertEqual(out, "before exit\n")

    def test_sys_exit_with_a_code_past_255_keeps_its_low_byte(self):
        job, _ = self.end("xjobs:code", 258)
        self.assertEqual((job["state"], job["exit_code"]), ("failed", 2))

    def test_a_code_past_a_c_long_exits_255_never_0(self):
        for sign in (1, -1):
            job, _ = self.end("xjobs:huge", sign)
            self.assertEqual((job["state"], job["exit_code"]), ("failed", 255))

    def test_sys_exit_without_a_code_is_exit_status_zero(self):
        job, _ = self.end("xjobs:code", None)
        self.assertEqual(job["exit_code"], 0)

    def test_sys_exit_with_a_message_prints_it_and_exits_1(self):
        job, out = self.end("xjobs:message")
        self.assertEqual((job["state"], job["exit_code"]), ("failed", 1))
        self.assertIn("a message from the job\n", out)

    def test_atexit_functions_run_into_the_output_after_a_return(self):
        job, out = self.end("xjobs:with_atexit")
        self.assertEqual((job["state"], job["result"]), ("succeeded", "returned"))
        self.assertEqual(out, "atexit ran\n")

    def test_atexit_functions_run_after_sys_exit_too(self):
        job, out = self.end("xjobs:atexit_then_exit")
        self.assertEqual((job["state"], job["exit_code"]), ("failed", 4))
        self.assertEqual(out, "atexit ran before the end\n")


class JobExitSpawn(JobExitZygote):
    config = dict(JobExitZygote.config, start_method="spawn")


class JobExitReuse(JobExitZygote):
    config = dict(JobExitZygote.config, isolation="reuse")


class JobExitSpare(JobExitZygote):
    """Each test's job runs in a spare (forked ahead while a CPU is free: eight, said the
    preamble), after a warm-up job that had a spare forked for the next attempt."""
    daemon_preamble = "jr._cpu_count = lambda: 8"

    def end(self, target, *args):
        d = self.daemon
        self.assertEqual(d.wait_job(d.add("examples.jobs:add", args=[1, 2]))["state"],
                         "succeeded")
        spares = support.wait_until(self.spares, 10, message="a spare to be forked")
        job, out = super().end(target, *args)
        self.assertIn(int(d.job_events(job["id"], "started")[0]["pid"]), spares)
        return job, out

    def spares(self):
        zygote = support.children_named(self.daemon.proc.pid, b"jobrunner-zygote")[0]
        return support.children_named(zygote, b"jobrunner: spare")


if __name__ == "__main__":
    unittest.main()
