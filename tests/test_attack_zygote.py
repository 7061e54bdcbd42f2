"""A helper that hangs or fails never wedges the daemon (SPEC §2, §3, §5 `start_method`).

The zygote (the fork server) is attacked as it fails for real: a `preload` whose import blocks,
a zygote stopped with SIGSTOP (with and without attempts), a preload error far over one
message, a preload that writes garbage to the zygote's socket. And starts that fail for a
reason of the host (no free file descriptor) are no attempts: the jobs wait and then run.
"""
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import unittest

from tests import support
from tests.support import DaemonTestCase, children_named, wait_until

JOBS = '''
import os, signal, time

def ok():
    return "ok"

def hold(flag):
    """Runs until `flag` exists."""
    print(os.getpid(), flush=True)
    while not os.path.exists(flag):
        time.sleep(0.01)
    return "released"

def stubborn():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(os.getpid(), flush=True)
    time.sleep(120)
'''

BLOCKING_PRELOAD = "import time\ntime.sleep(3600)     # a database connect with no timeout\n"
BIG_ERROR_PRELOAD = "raise ImportError('x' * 100000)\n"
# Preload code runs in the zygote: it can write anything to the zygote's socket to the daemon.
GARBAGE_PRELOAD = '''
import socket
for fd in range(3, 256):
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        continue
    try:
        if s.type == socket.SOCK_SEQPACKET:
            s.send(b"\\xff not json " * 8000)       # longer than one message may be, too
    except OSError:
        pass
    finally:
        s.detach()
'''

# Preload code runs in the zygote: it can make it lose every exit of its children (it answers
# requests and pings, but reaps nothing and so reports no exit).
LOSING_PRELOAD = "import os\nos.waitpid = lambda pid, options: (0, 0)\n"


def proc_state(pid: int) -> bytes | None:
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def proc_ppid(pid: int) -> int | None:
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


class ZygoteCase(DaemonTestCase):
    config = {"start_method": "zygote", "allow": ["examples.*:*", "zygjobs:*"], "workers": 1,
              "kill_grace": 1, "shutdown_grace": 30}
    preload_source = None

    def prepare(self):
        self.write_job_module("zygjobs", JOBS)
        if self.preload_source is not None:
            self.write_job_module("zygpreload", self.preload_source)

    def zygotes(self) -> list[int]:
        return children_named(self.daemon.proc.pid, b"jobrunner-zygote")

    def stop_zygote(self) -> int:
        [zygote] = wait_until(self.zygotes, 10, message="one zygote")
        os.kill(zygote, signal.SIGSTOP)
        self.addCleanup(self.kill_quietly, zygote)
        return zygote

    @staticmethod
    def kill_quietly(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def job_pid(self, job_id) -> int:
        return int(wait_until(lambda: support.job_output(
            self.daemon.call(op="output", id=job_id)["data"]), 15,
                              message="the job to print its pid").split()[0])

    def assert_stops_within(self, seconds):
        start = time.monotonic()
        self.daemon.proc.send_signal(signal.SIGTERM)
        try:
            code = self.daemon.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            self.fail("the graceful stop took more than %gs" % seconds)
        self.daemon.stderr.close()
        self.assertEqual(code, 0, self.daemon.read_stderr())
        return time.monotonic() - start


class PreloadThatBlocksTest(ZygoteCase):
    """The zygote never says "ready": after its start-up deadline it is killed, and jobs run
    by spawn (the jobs waiting on it go back to pending without counting)."""
    config = dict(ZygoteCase.config, preload=["zygpreload"])
    daemon_preamble = "jr.ZYGOTE_START_TIMEOUT = 1.5"     # not 10 s: tests need not wait that long
    preload_source = BLOCKING_PRELOAD

    def test_jobs_run_by_spawn_once_the_zygote_missed_its_start_deadline(self):
        ids = [self.daemon.add("zygjobs:ok") for _ in range(3)]
        for job_id in ids:
            job = self.daemon.wait_job(job_id, timeout=30)
            self.assertEqual((job["state"], job["attempts"], job["result"]),
                             ("succeeded", 1, "ok"), job)
        self.assertIn("was not ready (preloaded) within 1.5s", self.daemon.read_stderr())
        self.assertEqual(self.daemon.job_events(ids[0], "retrying"), [])


class PreloadThatBlocksAfterSighupTest(ZygoteCase):
    """The same, for the zygote that SIGHUP starts (the preload now blocks)."""
    config = dict(ZygoteCase.config, preload=["zygpreload"])
    daemon_preamble = "jr.ZYGOTE_START_TIMEOUT = 1.5"
    preload_source = "LOADED = True\n"

    def test_jobs_run_by_spawn_once_the_new_zygote_missed_its_start_deadline(self):
        self.assertEqual(self.daemon.wait_job(self.daemon.add("zygjobs:ok"))["state"],
                         "succeeded")
        old = self.zygotes()
        self.write_job_module("zygpreload", BLOCKING_PRELOAD)
        self.daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: set(self.zygotes()) - set(old), 10, message="the new zygote")
        job = self.daemon.wait_job(self.daemon.add("zygjobs:ok"), timeout=30)
        self.assertEqual((job["state"], job["attempts"]), ("succeeded", 1), job)
        wait_until(lambda: "was not ready (preloaded) within 1.5s" in self.daemon.read_stderr(),
                   15, message="the new zygote to be given up")


class ZygoteNeverReadyTest(ZygoteCase):
    """A zygote stuck in its preload for the whole test: attempts given to it have no process."""
    config = dict(ZygoteCase.config, preload=["zygpreload"], shutdown_grace=1)
    daemon_preamble = "jr.ZYGOTE_START_TIMEOUT = 120.0"
    preload_source = BLOCKING_PRELOAD

    def test_the_timeout_counts_before_the_process_exists(self):
        job = self.daemon.wait_job(self.daemon.add("zygjobs:ok", timeout=1), timeout=30)
        self.assertEqual((job["state"], job["attempts"]), ("failed", 1), job)
        self.assertIn("timed out after 1s", job["error"])

    def test_cancel_frees_the_slot_of_an_attempt_with_no_process(self):
        first = self.daemon.add("zygjobs:ok")           # takes the only worker, forever
        second = self.daemon.add("zygjobs:ok", timeout=1, priority=-1)
        self.assertEqual(self.daemon.call(op="cancel", id=first)["job"]["state"], "cancelled")
        # Only with its slot free can the second job start, and time out.
        job = self.daemon.wait_job(second, timeout=30)
        self.assertEqual((job["state"], job["attempts"]), ("failed", 1), job)

    def test_a_graceful_stop_ends_with_an_attempt_that_has_no_process(self):
        job_id = self.daemon.add("zygjobs:ok")
        self.daemon.get(job_id)             # a later pass than the add's: the job was started
        self.assert_stops_within(1 + 1 + 2 + 10)        # grace + kill_grace + slack + load
        self.daemon.start()                             # its attempt did not count
        self.assertEqual(self.daemon.get(job_id)["attempts"], 0)


class StoppedZygoteTest(ZygoteCase):
    """SIGSTOP: the zygote forks nothing and reports no exit. A ping with a deadline finds it,
    and it is replaced; what its children had done is taken from /proc."""
    config = dict(ZygoteCase.config, shutdown_grace=1)

    def test_a_job_that_ended_under_a_stopped_zygote_is_not_a_timeout(self):
        flag = os.path.join(self.root, "flag")
        job_id = self.daemon.add("zygjobs:hold", args=[flag], timeout=8)
        self.job_pid(job_id)
        self.stop_zygote()
        open(flag, "w").close()             # the job returns, reports "ok", exits: unreported
        job = self.daemon.wait_job(job_id, timeout=30)
        self.assertEqual((job["state"], job["result"], job["attempts"]),
                         ("succeeded", "released", 1), job)
        self.assertEqual(self.daemon.job_events(job_id, "timed_out"), [])
        # Its exit came from /proc (the pipes closed, or the ping found the zygote stopped,
        # whichever was first); the unanswered ping has the zygote replaced in any case.
        wait_until(lambda: "did not answer a ping" in self.daemon.read_stderr(), 15,
                   message="the stopped zygote to be found")
        again = self.daemon.wait_job(self.daemon.add("zygjobs:ok"), timeout=30)
        self.assertEqual(again["state"], "succeeded", again)

    def test_a_job_that_ended_under_a_zygote_then_killed_keeps_its_report(self):
        # Its zombie goes with the zygote: what is left is its "ok" report and closed pipes.
        flag = os.path.join(self.root, "flag")
        job_id = self.daemon.add("zygjobs:hold", args=[flag])
        job_pid = self.job_pid(job_id)
        zygote = self.stop_zygote()
        open(flag, "w").close()
        wait_until(lambda: proc_state(job_pid) in (None, b"Z"), 10, message="the job to end")
        # The daemon must not see the zygote's end before the zombie is gone (reaped by init;
        # a daemon that is a subreaper gets it instead, and reads its status).
        os.kill(self.daemon.proc.pid, signal.SIGSTOP)
        try:
            os.kill(zygote, signal.SIGKILL)
            wait_until(lambda: proc_state(job_pid) is None or
                       proc_ppid(job_pid) == self.daemon.proc.pid, 15,
                       message="the job's zombie to be reaped")
        finally:
            os.kill(self.daemon.proc.pid, signal.SIGCONT)
        job = self.daemon.wait_job(job_id, timeout=30)
        self.assertEqual((job["state"], job["result"], job["attempts"]),
                         ("succeeded", "released", 1), job)

    def test_a_job_added_while_the_zygote_is_stopped_starts_another_way(self):
        self.assertEqual(self.daemon.wait_job(self.daemon.add("zygjobs:ok"))["state"],
                         "succeeded")           # the zygote is up and has answered
        stopped_at = time.monotonic()
        self.stop_zygote()
        job_id = self.daemon.add("zygjobs:ok")
        job = self.daemon.wait_job(job_id, timeout=30)
        took = time.monotonic() - stopped_at
        self.assertEqual((job["state"], job["attempts"]), ("succeeded", 1), job)
        # (a spare forked before the stop runs it without a fork: then the stopped zygote is
        # found by its ping, or by the fork of the spare that replaces it, maybe after the job)
        wait_until(lambda: re.search("did not answer a (fork request|ping)",
                                     self.daemon.read_stderr()), 15,
                   message="the stopped zygote to be found")
        self.assertLess(took, 3.0 + 10)         # ZYGOTE_REPLY_TIMEOUT + room for a busy host
        if os.environ.get("JOBRUNNER_FIGURES"):
            print("\nSIGSTOP of the zygote -> job done by spawn: %.2fs" % took, file=sys.stderr)

    def test_a_graceful_stop_ends_under_a_stopped_zygote_and_a_stubborn_job(self):
        job_id = self.daemon.add("zygjobs:stubborn")
        self.job_pid(job_id)
        self.stop_zygote()
        self.assert_stops_within(1 + 1 + 2 + 10)


class ZygoteThatLosesExitsTest(ZygoteCase):
    """A zygote that answers but never reports an exit: the attempt's pipes closing, /proc,
    and the stop's hard deadline end what it no longer tells about."""
    config = dict(ZygoteCase.config, preload=["zygpreload"], shutdown_grace=1)
    preload_source = LOSING_PRELOAD

    def test_an_ended_job_is_recorded_from_proc(self):
        job = self.daemon.wait_job(self.daemon.add("zygjobs:ok"), timeout=30)
        self.assertEqual((job["state"], job["result"], job["exit_code"]), ("succeeded", "ok", 0),
                         job)

    def test_a_graceful_stop_ends_at_its_hard_deadline(self):
        job_id = self.daemon.add("zygjobs:stubborn")
        self.job_pid(job_id)
        took = self.assert_stops_within(1 + 1 + 2 + 10)
        self.assertGreaterEqual(took, 1 + 1, "stopped before the job's grace ended")
        self.assertIn("given up", self.daemon.read_stderr())
        # Interrupted by the stop: back to pending, not counted as a failed attempt.
        self.assertEqual([e["event"] for e in self.daemon.job_events(job_id)],
                         ["queued", "started", "interrupted"])


class BigPreloadErrorTest(ZygoteCase):
    """A preload error far longer than one message: a warning, cut; jobs still run."""
    config = dict(ZygoteCase.config, preload=["zygpreload"])
    preload_source = BIG_ERROR_PRELOAD

    def test_at_start_up_and_on_sighup(self):
        for round in range(2):
            wait_until(lambda: self.daemon.read_stderr().count("preload zygpreload failed")
                       > round, 15, message="the preload warning")
            job = self.daemon.wait_job(self.daemon.add("zygjobs:ok"), timeout=30)
            self.assertEqual(job["state"], "succeeded", job)
            self.assertIsNone(self.daemon.proc.poll(), self.daemon.read_stderr()[-2000:])
            self.daemon.proc.send_signal(signal.SIGHUP)
        for line in self.daemon.read_stderr().splitlines():
            self.assertLess(len(line), 5000, "a warning was not cut")


class GarbageFromTheZygoteTest(ZygoteCase):
    """A zygote that sends what it may not (here: its preload writes garbage to the socket) is
    broken: replaced, and the daemon never raises on it."""
    config = dict(ZygoteCase.config, preload=["zygpreload"])
    preload_source = GARBAGE_PRELOAD

    def test_jobs_run_and_the_daemon_lives(self):
        for _ in range(3):
            job = self.daemon.wait_job(self.daemon.add("zygjobs:ok"), timeout=30)
            self.assertEqual((job["state"], job["attempts"]), ("succeeded", 1), job)
        self.assertIsNone(self.daemon.proc.poll())
        self.assertIn("sent a message that is not what it may send", self.daemon.read_stderr())


class ZygoteMessageTest(unittest.TestCase):
    """What the daemon takes from a zygote: only the messages it may send, never an exception."""

    def parse(self, data: bytes, flags: int = 0):
        import jobrunnerd
        return jobrunnerd.Zygote._parse(data, flags)

    def test_good_messages(self):
        for msg in (b'{"started": 3, "pid": 1234, "start": 99}', b'{"started": 3, "error": "x"}',
                    b'{"exit": 1234, "status": 256}', b'{"pong": 1}', b'{"ready": true}',
                    b'{"warning": "preload x failed"}'):
            with self.subTest(msg=msg):
                self.assertIsInstance(self.parse(msg), dict)

    def test_what_is_not_a_message(self):
        import socket
        for msg in (b"", b"\xff", b"[1]", b'{"started": "3", "pid": 5}',
                    b'{"started": 3, "pid": -1}', b'{"started": 3, "pid": "5"}',
                    b'{"exit": 0, "status": 0}', b'{"exit": 5, "status": null}',
                    b'{"warning": 5}', b'{"other": 1}', b"[" * 100000 + b"]" * 100000):
            with self.subTest(msg=msg[:40]):
                self.assertIsNone(self.parse(msg))
        self.assertIsNone(self.parse(b'{"pong": 1}', socket.MSG_TRUNC), "a message cut short")


####################################################################################################
#  No free file descriptor
####################################################################################################

NOFILE = 64


def low_nofile():
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


class LimitedDaemon(support.Daemon):
    """The fixture's daemon, started under soft = hard RLIMIT_NOFILE (it cannot raise it)."""

    limit = staticmethod(low_nofile)

    def start(self, wait=True, env=None, args=()):
        self.write_config()
        self.stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen([sys.executable, support.DAEMON, "--config",
                                      self.config_path, *args], stdin=subprocess.DEVNULL,
                                     stdout=self.stderr, stderr=self.stderr,
                                     env=support.daemon_env() if env is None else env,
                                     preexec_fn=self.limit)
        if wait:
            self.wait_ready()
        return self


class NoFreeFdTest(unittest.TestCase):
    START_METHOD = "zygote"

    def setUp(self):
        tmp = self.enterContext(tempfile.TemporaryDirectory(prefix="jr-test-"))
        self.daemon = LimitedDaemon(tmp, workers=2, max_connections=200,
                                    start_method=self.START_METHOD)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)

    def fds(self) -> int:
        return len(os.listdir("/proc/%d/fd" % self.daemon.proc.pid))

    def cpu_seconds(self) -> float:
        with open("/proc/%d/stat" % self.daemon.proc.pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def test_jobs_added_while_no_fd_is_free_wait_then_run(self):
        d = self.daemon
        self.assertIn("hard limit of %d" % NOFILE, d.read_stderr())
        control = d.raw()
        self.addCleanup(control.close)
        self.assertTrue(control.call(op="hello")["ok"])
        idle = []
        try:
            # Idle connections take the daemon's fds until 3 are left: a pipe fits, not also
            # the attempt's channel.
            while self.fds() < NOFILE - 3:
                before = self.fds()
                idle.append(d.raw())
                wait_until(lambda: self.fds() > before, 10, message="the connection accepted")
            ids = [control.call(op="add", target="examples.jobs:echo", args=[i])["id"]
                   for i in range(3)]
            wait_until(lambda: "stays pending" in d.read_stderr(), 10,
                       message="the start to fail for want of an fd")
            for job_id in ids:
                job = control.call(op="get", id=job_id)["job"]
                self.assertEqual((job["state"], job["attempts"], job["pid"]),
                                 ("pending", 0, None), job)
            # It tries again shortly, but does not spin meanwhile (a measurement, not a wait
            # for anything: a second of the daemon's CPU time against the wall clock).
            cpu, wall = self.cpu_seconds(), time.monotonic()
            time.sleep(1.0)
            self.assertLess((self.cpu_seconds() - cpu) / (time.monotonic() - wall), 0.25,
                            "the daemon spins while no fd is free")
        finally:
            for conn in idle:
                conn.close()
        for job_id in ids:
            job = control.call(op="wait", id=job_id, timeout=30)["job"]
            self.assertEqual((job["state"], job["attempts"]), ("succeeded", 1), job)
            self.assertEqual([e["event"] for e in d.job_events(job_id)],
                             ["queued", "started", "succeeded"])
        self.assertEqual(d.read_stderr().count("stays pending"), 1, "logged once a minute")

    def test_check_config_says_when_the_limit_is_too_low(self):
        self.daemon.write_config()
        out = subprocess.run([sys.executable, support.DAEMON, "--check-config", "--config",
                              self.daemon.config_path], capture_output=True, text=True,
                             preexec_fn=low_nofile, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("max_connections = 200 and workers = 2 need about 280 file descriptors, "
                      "more than the hard limit of 64", out.stdout)


class NoFreeFdSpawnTest(NoFreeFdTest):
    START_METHOD = "spawn"


class SoftFdLimitTest(unittest.TestCase):
    """A soft RLIMIT_NOFILE below what max_connections and workers need is raised at start-up,
    as far as the hard limit allows."""

    def test_the_soft_limit_is_raised_to_what_the_config_needs(self):
        tmp = self.enterContext(tempfile.TemporaryDirectory(prefix="jr-test-"))
        daemon = SoftLimitedDaemon(tmp, workers=2, max_connections=200)
        daemon.start()
        self.addCleanup(daemon.stop)
        soft, hard = resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE)
        self.assertEqual(hard, 4096)
        self.assertGreaterEqual(soft, 200 + 8 * 2 + 64)     # max_connections + 8/worker + 64


def soft_nofile_only():
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, 4096))


class SoftLimitedDaemon(LimitedDaemon):
    """The fixture's daemon under a soft RLIMIT_NOFILE of NOFILE, with room up to 4096."""

    limit = staticmethod(soft_nofile_only)


if __name__ == "__main__":
    unittest.main()
