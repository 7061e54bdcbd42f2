"""No process of an attempt outlives it, also one that left the attempt's group or session.

A job starts a process that escapes the way a daemonising tool does, writes its pid to a file,
and sleeps: `setsid()` in a forked child ("fork"), setsid plus a second fork whose middle process
exits ("double"), setsid twice in a chain whose middle process stays ("chain": the inner one
comes back to the subreaper only once the middle one is killed), a new session that execs a new
interpreter ("exec"), and the same with an empty environment ("wiped": no JOBRUNNER_* variables
to tell whose it is). The escaped process
must be gone (a zombie counts as gone) after a timeout, a cancel, a normal return, a graceful
stop, and a SIGKILL of the daemon plus a restart; and the end of one attempt must never kill what
another attempt, still running, started. Each scenario runs under both start methods.
"""
import os
import signal
import subprocess
import sys
import unittest
from unittest import mock

import jobrunnerd as jr

from tests.support import ROOT, Daemon, DaemonTestCase, daemon_env, wait_until

JOB_MODULE = r'''
import os, subprocess, sys, time

def _write_pid(pidfile):
    """pid, start time and session of this process (the test may find it already killed)."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    with open(pidfile + ".tmp", "w") as f:
        f.write("%d %d %d" % (os.getpid(), int(fields[19]), os.getsid(0)))
    os.rename(pidfile + ".tmp", pidfile)

SLEEPER = ("import sys, time\n"
           "sys.path[:0] = [%r]\n"
           "from testjobs_contain import _write_pid\n"
           "_write_pid(sys.argv[1])\n"
           "time.sleep(3600)\n" % os.path.dirname(os.path.abspath(__file__)))

def escape(pidfile, mode, then="sleep"):
    """Leave behind a process that escaped our group and session; then sleep or return."""
    if mode in ("exec", "wiped"):
        subprocess.Popen([sys.executable, "-c", SLEEPER, pidfile], start_new_session=True,
                         env={} if mode == "wiped" else None)
    else:
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                if mode == "double" and os.fork():
                    os._exit(0)                 # the middle process: its child is orphaned
                if mode == "chain":
                    _write_pid(pidfile + ".middle")     # for the test's clean-up only
                    if os.fork():
                        time.sleep(3600)        # the middle process stays, in its session
                    os.setsid()                 # and its child leaves that one too
                _write_pid(pidfile)
                time.sleep(3600)                # the escaped process's whole job
            finally:
                os._exit(0)
        if mode == "double":
            os.waitpid(pid, 0)
    while not os.path.exists(pidfile):          # returning earlier would race the test
        time.sleep(0.01)
    if then == "sleep":
        time.sleep(3600)
    return "returned"
'''

MODES = ("fork", "double", "chain", "exec", "wiped")
FOUND_AFTER_A_CRASH = ("fork", "double", "chain", "exec")  # "wiped" has no mark: see README


def read_file(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def process_state(pid: int, start: int) -> str | None:
    """The state letter of the process `pid` born at `start`, None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return fields[0].decode() if int(fields[19]) == start else None


def process_alive(pid: int, start: int) -> bool:
    return process_state(pid, start) not in (None, "Z", "X")


class ContainScenarios:
    """Mixed into a DaemonTestCase with a given start_method."""

    def setUp(self):
        super().setUp()
        self.write_job_module("testjobs_contain", JOB_MODULE)
        self.escaped = []           # (pid, start) of every escaped process, killed at cleanup
        self.addCleanup(self._kill_escaped)

    def _kill_escaped(self):
        """Whatever a failed test left (the middle processes of "chain" included)."""
        middles = [read_file(os.path.join(self.root, name)) for name in os.listdir(self.root)
                   if name.endswith(".middle")]
        for pid, start in self.escaped + [tuple(map(int, m.split()[:2])) for m in middles if m]:
            if process_alive(pid, start):
                os.kill(pid, signal.SIGKILL)

    def start_escaping(self, mode, then="sleep", daemon=None, **fields):
        """Add a job that leaves a process of `mode`; returns (job id, (pid, start))."""
        pidfile = os.path.join(self.root, "escaped-%s-%d" % (mode, len(self.escaped)))
        job_id = (daemon or self.daemon).add("testjobs_contain:escape",
                                             args=[pidfile, mode, then], **fields)
        pid, start, sid = map(int, wait_until(
            lambda: read_file(pidfile), 20,
            message="the %s process of job %d to start" % (mode, job_id)).split())
        self.escaped.append((pid, start))
        self.assertNotEqual(sid, os.getsid(self.daemon.proc.pid),
                            "the process did leave the attempt's session")
        if then == "sleep":
            self.assertTrue(process_alive(pid, start))
        return job_id, (pid, start)

    def assert_gone(self, proc, what, timeout=10):
        wait_until(lambda: not process_alive(*proc), timeout,
                   message="the escaped process %d (%s) to be gone" % (proc[0], what))

    # Each test starts every mode's job at once (workers = 6) and then checks them: the same
    # checks as one mode after the other, in the time of one.

    def test_timeout(self):
        started = [(mode, *self.start_escaping(mode, timeout=1)) for mode in MODES]
        for mode, job_id, proc in started:
            with self.subTest(mode=mode):
                job = self.daemon.wait_job(job_id)
                self.assertIn("timed out", job["error"])
                self.assert_gone(proc, mode)

    def test_cancel(self):
        started = [(mode, *self.start_escaping(mode)) for mode in MODES]
        for mode, job_id, proc in started:
            with self.subTest(mode=mode):
                self.assertTrue(self.daemon.call(op="cancel", id=job_id)["ok"])
                self.assert_gone(proc, mode)

    def test_normal_return(self):
        started = [(mode, *self.start_escaping(mode, then="return")) for mode in MODES]
        for mode, job_id, proc in started:
            with self.subTest(mode=mode):
                job = self.daemon.wait_job(job_id)
                self.assertEqual((job["state"], job["result"]), ("succeeded", "returned"))
                self.assert_gone(proc, mode)

    def test_graceful_stop(self):
        procs = [(mode, self.start_escaping(mode)[1]) for mode in MODES]
        self.assertEqual(self.daemon.stop(signal.SIGTERM), 0)
        for mode, proc in procs:
            self.assert_gone(proc, mode, timeout=0.5)   # the daemon exits after it kills them

    def test_daemon_killed_then_restarted(self):
        jobs = [(mode, *self.start_escaping(mode)) for mode in FOUND_AFTER_A_CRASH]
        self.daemon.kill()
        self.daemon.start()
        for mode, job_id, proc in jobs:
            self.assert_gone(proc, mode, timeout=0.5)   # killed before the daemon answers
            job = self.daemon.get(job_id)       # no retries: it does not run again
            self.assertEqual(job["state"], "failed")
            self.assertIn("interrupted", job["error"])

    def test_a_restart_spares_another_daemons_attempt_with_the_same_numbers(self):
        # Job 1, attempt 1 of a daemon that runs on: its processes carry the same marks as
        # ours, and started later, but they are held by a live process tree, not orphaned.
        other = Daemon(os.path.join(self.root, "other"), **dict(
            self.config, job_paths=[ROOT, os.path.join(self.root, "jobs")]))
        os.makedirs(other.root)
        other.start(env=daemon_env())
        self.addCleanup(other.stop)
        ours_id, ours = self.start_escaping("fork")
        theirs_id, theirs = self.start_escaping("double", daemon=other)
        self.assertEqual((ours_id, theirs_id), (1, 1))
        self.daemon.kill()
        self.daemon.start()
        self.assert_gone(ours, "fork", timeout=0.5)
        self.assertTrue(process_alive(*theirs), "another daemon's job process was killed")
        self.assertEqual(other.get(theirs_id)["state"], "running")

    def test_the_end_of_one_attempt_spares_a_running_one(self):
        # "wiped" is told apart by birth: it started while its own attempt ran, and that one
        # still runs. (The other way round, a "wiped" process of the ending attempt is killed
        # only once no attempt that ran at its birth runs any more.)
        for mode, other in (("fork", "fork"), ("exec", "exec"), ("wiped", "fork")):
            with self.subTest(mode=mode):
                running_id, running = self.start_escaping(mode)
                ending_id, ending = self.start_escaping(other, then="return")
                self.assertEqual(self.daemon.wait_job(ending_id)["state"], "succeeded")
                self.assert_gone(ending, other)
                self.assertTrue(process_alive(*running), "killed by another attempt's end")
                self.assertEqual(self.daemon.get(running_id)["state"], "running")
                self.assertTrue(self.daemon.call(op="cancel", id=running_id)["ok"])
                self.assert_gone(running, mode)

    def test_an_attempt_of_a_retired_zygote(self):
        # SIGHUP retires the zygote; it exits once its attempt is over, and what it had
        # adopted goes to the daemon (under "spawn", the daemon had it all along).
        job_id, proc = self.start_escaping("chain")
        self.daemon.proc.send_signal(signal.SIGHUP)
        self.assertTrue(self.daemon.call(op="cancel", id=job_id)["ok"])
        self.assert_gone(proc, "chain")


class BirthRuleTest(unittest.TestCase):
    """Containment.sweep() on this process's own children: a process without a mark is judged
    by its birth, and one born before any attempt is of none (a program embedding a Daemon may
    have children of its own, in sessions of their own)."""

    def test_an_unmarked_child_is_killed_only_if_born_after_an_attempt_that_is_over(self):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                 start_new_session=True, env={})
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        start = jr.proc_start_time(child.pid)
        runner = mock.Mock(active={}, by_pid={}, zygotes=[])
        containment = jr.Containment(runner)
        self.assertEqual(containment.sweep(), 0)
        self.assertIsNone(child.poll(), "killed, though born before any attempt")
        # A spawned attempt born a tick before it (one born in the same tick as the first
        # attempt counts as born before it: /proc's start times are 10 ms ticks).
        running = mock.Mock(job=mock.Mock(id=7), number=1, pid=1, pid_start=start - 1,
                            zygote=None)
        runner.active = {1: running}            # an attempt that ran at its birth still runs
        containment.attempt_started(running)
        self.assertEqual(containment.sweep(), 0)
        self.assertIsNone(child.poll(), "killed while an attempt that ran at its birth runs")
        runner.active = {}                      # that attempt is over
        self.assertEqual(containment.sweep(), 1)
        # Gone (the sweep may have reaped it itself: it had adopted it as an orphan).
        wait_until(lambda: not process_alive(child.pid, start), 10, message="the kill")


    def test_children_without_the_children_file(self):
        # Kernels without CONFIG_PROC_CHILDREN: the parent field of every process says it.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        self.assertIn(child.pid, jr.child_pids(os.getpid()))
        self.assertEqual(sorted(jr.children_by_scan(os.getpid())),
                         sorted(jr.child_pids(os.getpid())))


class ZygoteContainTest(ContainScenarios, DaemonTestCase):
    config = {"start_method": "zygote", "allow": ["testjobs*:*"], "workers": 6,
              "kill_grace": 0.5, "shutdown_grace": 0.5}


class SpawnContainTest(ContainScenarios, DaemonTestCase):
    config = {"start_method": "spawn", "allow": ["testjobs*:*"], "workers": 6,
              "kill_grace": 0.5, "shutdown_grace": 0.5}


POOL_MODULE = r'''
import os, subprocess, sys
# A preloaded module that starts a helper of its own (a connection pool's process, say): the
# helper is a child of the zygote, born before any of that zygote's attempts, and no attempt's.
_helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers.txt"), "a") as f:
    f.write("%d\n" % _helper.pid)

def noop():
    return 1
'''


class PreloadHelperTest(DaemonTestCase):
    """A replacement zygote's preload may start helpers long after the first attempt of all;
    they belong to no attempt, and the sweeps after later attempts must spare them."""

    config = {"preload": ["testjobs_pool"], "allow": ["testjobs_pool:*"],
              "start_method": "zygote"}

    def prepare(self):
        self.write_job_module("testjobs_pool", POOL_MODULE)

    def helpers(self) -> list[int]:
        path = os.path.join(self.root, "jobs", "helpers.txt")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [int(pid) for pid in f.read().split()]

    def run_one(self) -> None:
        job_id = self.daemon.call(op="add", target="testjobs_pool:noop")["id"]
        self.assertEqual(self.daemon.wait_job(job_id)["state"], "succeeded")
        self.daemon.call(op="hello")        # a later pass: the sweep after that end has run

    def test_the_helpers_of_a_replacement_zygote_are_spared(self):
        self.addCleanup(lambda: [kill_quietly(pid) for pid in self.helpers()])
        wait_until(lambda: len(self.helpers()) >= 1, 15, message="the first zygote's helper")
        self.run_one()
        self.daemon.proc.send_signal(signal.SIGHUP)     # a new zygote, a new helper
        wait_until(lambda: len(self.helpers()) >= 2, 15, message="the second zygote's helper")
        for _ in range(3):                              # attempts of the new zygote end
            self.run_one()
        for pid in self.helpers():
            self.assertTrue(helper_alive(pid), "helper %d was killed" % pid)


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def helper_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


if __name__ == "__main__":
    unittest.main()
