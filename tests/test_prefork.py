"""Spares of fresh queues: with start_method "zygote", each attempt of a fresh queue asks the
zygote for a process forked ahead of time (a spare, up to one per slot), and the next attempt
runs in it: its pid known at dispatch, its fork paid while the slot's previous attempt ran.
A spare runs ONE attempt and exits (fresh, SPEC §2). Spares are forked only while fewer
attempts run than there are CPUs (the tests set that number). End to end through the socket, a real
daemon, polling: one attempt per spare, a spare dies with a SIGKILLed daemon, SIGHUP and
set_workers retire spares, a spare killed while idle is no attempt and is replaced.
"""
import os
import signal
import unittest

from tests.support import DaemonTestCase, children_named, wait_until

JOB_MODULE = '''
import os

def who():
    return os.getpid()
'''


def alive(pid: int) -> bool:
    """Is `pid` a live process (not gone, not a zombie)?"""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class PreforkTestCase(DaemonTestCase):
    config = {"workers": 1, "allow": ["examples.*:*", "testjobs_prefork:*"], "kill_grace": 0.5}
    daemon_preamble = "jr._cpu_count = lambda: 8"   # spares are forked while a CPU is free

    def prepare(self):
        self.write_job_module("testjobs_prefork", JOB_MODULE)

    def zygote(self) -> int:
        return wait_until(lambda: children_named(self.daemon.proc.pid, b"jobrunner-zygote"),
                          message="the zygote")[0]

    def spares(self) -> list[int]:
        """The zygote's idle spares (a spare's command line says so until its attempt)."""
        return [pid for pid in children_named(self.zygote(), b"jobrunner: spare")
                if alive(pid)]

    def run_who(self) -> int:
        job = self.daemon.wait_job(self.daemon.add("testjobs_prefork:who"), timeout=20)
        self.assertEqual(job["state"], "succeeded", job)
        return job["result"]


class OneAttemptPerSpareTest(PreforkTestCase):

    def test_each_attempt_runs_in_the_spare_forked_before_it_and_the_spare_then_exits(self):
        first = self.run_who()
        pids = [first]
        for _ in range(3):
            spare = wait_until(self.spares, message="a spare after an attempt")
            self.assertEqual(len(spare), 1, "one slot: one spare")
            pid = self.run_who()
            self.assertEqual(pid, spare[0], "the attempt did not run in the idle spare")
            wait_until(lambda: not alive(pid), message="the spare to exit after its attempt")
            pids.append(pid)
        self.assertEqual(len(set(pids)), len(pids), "a process ran two attempts: %s" % pids)

    def test_a_spare_killed_while_idle_is_no_attempt_and_is_replaced(self):
        self.run_who()
        spare = wait_until(self.spares, message="a spare")[0]
        os.kill(spare, signal.SIGKILL)
        wait_until(lambda: spare not in self.spares(), message="the killed spare gone")
        pid = self.run_who()
        self.assertNotEqual(pid, spare)
        new = wait_until(self.spares, message="a new spare")
        self.assertNotIn(spare, new)
        self.assertEqual(self.run_who(), new[0])
        counts = self.daemon.call(op="stats")["counts"]
        self.assertEqual((counts["succeeded"], counts["failed"]), (3, 0), counts)


class RetireTest(PreforkTestCase):
    config = dict(PreforkTestCase.config, workers=2)

    def test_sighup_retires_idle_spares_and_the_next_attempt_runs_fresh(self):
        self.run_who()
        old = wait_until(self.spares, message="a spare")
        old_zygote = self.zygote()
        os.kill(self.daemon.proc.pid, signal.SIGHUP)
        wait_until(lambda: not any(alive(pid) for pid in old), message="old spares gone")
        pid = self.run_who()
        self.assertNotIn(pid, old)
        new = wait_until(lambda: [z for z in children_named(self.daemon.proc.pid,
                                                            b"jobrunner-zygote")
                                  if z != old_zygote and alive(z)], message="the new zygote")
        wait_until(lambda: children_named(new[0], b"jobrunner: spare"),
                   message="a spare of the new zygote")

    def test_set_workers_down_trims_idle_spares(self):
        ids = [self.daemon.add("testjobs_prefork:who") for _ in range(6)]
        for job_id in ids:
            self.assertEqual(self.daemon.wait_job(job_id, timeout=20)["state"], "succeeded")
        wait_until(lambda: len(self.spares()) == 2, message="two spares for two slots")
        self.daemon.call(op="set_workers", queue="default", workers=1)
        wait_until(lambda: len(self.spares()) == 1, message="one spare left for one slot")
        self.daemon.call(op="set_workers", queue="default", workers=0)
        wait_until(lambda: not self.spares(), message="no spare left for no slot")


class BusyHostTest(PreforkTestCase):
    daemon_preamble = "jr._cpu_count = lambda: 1"

    def test_no_spare_is_forked_while_the_attempts_running_hold_every_cpu(self):
        for _ in range(3):
            pid = self.run_who()
            wait_until(lambda: not alive(pid), message="the job process to exit")
            # A spare asked for with an attempt is forked before the zygote reports that
            # attempt's exit (its requests are answered in order): none was asked for.
            self.assertEqual([p for p in children_named(self.zygote(), b"") if alive(p)], [])


class GracefulStopTest(PreforkTestCase):

    def test_a_stop_with_a_spare_idle_leaves_stderr_clean_and_exits_0(self):
        # The stop retires the spare; the zygote reports its exit to a daemon that closes the
        # socket without reading it: the zygote's next read is a reset, which once made it close
        # the fds of the request before (EBADF, a traceback on the daemon's stderr).
        self.run_who()
        wait_until(self.spares, message="a spare after an attempt")
        self.daemon.stop(signal.SIGTERM, timeout=30)
        self.assertEqual(self.daemon.proc.returncode, 0)
        self.assertNotIn("Traceback", self.daemon.read_stderr())


class DaemonCrashTest(PreforkTestCase):

    def test_an_idle_spare_dies_with_a_sigkilled_daemon(self):
        self.run_who()
        spare = wait_until(self.spares, message="a spare")
        self.daemon.kill()
        wait_until(lambda: not any(alive(pid) for pid in spare), timeout=10,
                   message="the spare to die with the daemon")


if __name__ == "__main__":
    unittest.main()
