"""A fresh attempt's process: its name in ps cut to the argv area with the attempt's mark whole
after it, nothing one attempt leaves in the job-process code or a zygote's module seen by the next,
a large job spec read whole; its name in top "job ID N/M" also in a spare and a reused worker."""
import os
import unittest

from tests import support
import jobrunnerd as jr

# A module name and function name long enough that the job's title (its name in ps) cannot fit
# the zygote's argv area: the title is cut, the attempt's mark after it must stay whole.
LONG_MODULE = "m" * 150
LONG_FUNC = "f" * 200

LONG_JOBS = """
import time

def %s(path):
    with open(path, "w") as f:
        f.write("up")
    time.sleep(60)
""" % LONG_FUNC

# Each attempt's process runs _main() from the namespace the zygote defined once: what a job
# leaves there (or in a module the zygote imported) must not be seen by the next attempt.
TAINT_JOBS = """
import json, sys

def taint():
    namespace = sys._getframe(1).f_globals          # _main()'s: the job process's code
    seen = [namespace.get("TAINTED"), getattr(json, "TAINTED", None)]
    namespace["TAINTED"] = True
    json.TAINTED = True
    return seen

def size(text):
    return len(text)
"""


class FreshPathZygote(support.DaemonTestCase):
    config = {"allow": ["examples.*:*", "tjobs:*", LONG_MODULE + ":*"],
              "start_method": "zygote"}

    def prepare(self):
        self.write_job_module(LONG_MODULE, LONG_JOBS)
        self.write_job_module("tjobs", TAINT_JOBS)

    @staticmethod
    def read(path):
        with open(path, "rb") as f:
            return f.read()

    def test_a_title_longer_than_the_argv_keeps_the_attempt_mark_whole(self):
        d = self.daemon
        path = os.path.join(self.root, "up")
        target = "%s:%s" % (LONG_MODULE, LONG_FUNC)
        job_id = d.add(target, args=[path])
        pid = d.wait_state(job_id, "running")["pid"]
        support.wait_until(lambda: os.path.exists(path), message="the job to run")
        items = self.read("/proc/%d/cmdline" % pid).split(b"\0")
        title = ("jobrunner: job %d attempt 1/1 %s" % (job_id, target)).encode()
        self.assertTrue(title.startswith(items[0]) and len(items[0]) >= 16, items[0])
        self.assertLess(len(items[0]), len(title))         # cut: the area is shorter
        self.assertEqual(items[1:4], [b"jobrunner-job", b"%d" % job_id, b"1"])
        self.assertEqual(jr.argv_mark(pid), (job_id, 1))   # what containment reads
        self.assertEqual(self.read("/proc/%d/comm" % pid), b"job %d 1/1\n" % job_id)

    def test_nothing_an_attempt_leaves_in_its_process_reaches_the_next(self):
        d = self.daemon
        for _ in range(3):
            job = d.wait_job(d.add("tjobs:taint"))
            self.assertEqual((job["state"], job["result"]), ("succeeded", [None, None]))

    def test_a_job_spec_larger_than_one_read_arrives_whole(self):
        d = self.daemon
        text = "x" * 800_000                # the spec comes in many reads of fd 3
        job = d.wait_job(d.add("tjobs:size", args=[text]))
        self.assertEqual((job["state"], job["result"]), ("succeeded", len(text)))


class FreshPathSpawn(FreshPathZygote):
    config = dict(FreshPathZygote.config, start_method="spawn")


class NameInTopReuse(support.DaemonTestCase):
    """A job's name in top (/proc/PID/comm) is "job ID N/M" in a reused worker too (and, below,
    in a spare), as in a forked or spawned child."""
    config = {"allow": ["examples.*:*", "sjobs:*"], "isolation": "reuse"}

    def prepare(self):
        self.write_job_module("sjobs", LONG_JOBS.replace(LONG_FUNC, "up"))

    def test_the_name_has_the_attempt_and_the_attempts_allowed(self):
        d = self.daemon
        self.assertEqual(d.wait_job(d.add("examples.jobs:add", args=[1, 2]))["state"],
                         "succeeded")                      # a worker (or a spare) is ready
        self.ready()
        path = os.path.join(self.root, "up")
        job_id = d.add("sjobs:up", args=[path], retries=2)
        pid = d.wait_state(job_id, "running")["pid"]
        support.wait_until(lambda: os.path.exists(path), message="the job to run")
        with open("/proc/%d/comm" % pid, "rb") as f:
            self.assertEqual(f.read(), b"job %d 1/3\n" % job_id)
        self.assertEqual(jr.argv_mark(pid), (job_id, 1))
        return pid

    def ready(self):
        """The worker that ran the first job is idle again: the next runs in it."""


class NameInTopSpare(NameInTopReuse):
    config = {"allow": ["examples.*:*", "sjobs:*"]}
    daemon_preamble = "jr._cpu_count = lambda: 8"   # spares are forked while a CPU is free

    def ready(self):
        zygote = support.children_named(self.daemon.proc.pid, b"jobrunner-zygote")[0]
        self.spares = support.wait_until(
            lambda: support.children_named(zygote, b"jobrunner: spare"), 10,
            message="a spare forked after the first job")

    def test_the_name_has_the_attempt_and_the_attempts_allowed(self):
        self.assertIn(super().test_the_name_has_the_attempt_and_the_attempts_allowed(),
                      self.spares)


if __name__ == "__main__":
    unittest.main()
