"""Worker reuse (SPEC §2d): `isolation = "reuse"` runs a queue's attempts one after another in
long-lived workers forked by the zygote. End to end through the socket, a real daemon, polling:
what each attempt still gets for itself (output, environment, result), what a worker keeps
(imported modules), when a worker is replaced (timeout, failure, max_jobs_per_worker, SIGHUP,
set_workers), that an attempt's leftover processes die with its end, and that a SIGKILLed
daemon loses no acknowledged job and leaves no job process behind (in both isolation modes).
"""
import os
import signal
import subprocess
import sys
import time
import unittest

from tests import support
from tests.support import DaemonTestCase, wait_until

JOB_MODULE = '''
import os, subprocess, sys, time

with open(os.path.join(os.path.dirname(__file__), "imports.log"), "a") as f:
    f.write("%d\\n" % os.getpid())          # one line per import of this module

VERSION = 1

def who():
    return os.getpid()

def version():
    return [VERSION, os.getpid()]

def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

def limits():
    import resource
    used = resource.getrusage(resource.RUSAGE_SELF)
    return {"pid": os.getpid(), "cpu": resource.getrlimit(resource.RLIMIT_CPU)[0],
            "used": used.ru_utime + used.ru_stime,
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}

def env_a():
    os.environ["LEAKED"] = "from job A"
    os.environ.pop("HOME", None)
    os.chdir("/")
    sys.path.insert(0, "/nowhere")
    print("output of A", flush=True)
    return {"pid": os.getpid(), "id": os.environ["JOBRUNNER_JOB_ID"]}

def env_b():
    print("output of B", flush=True)
    return {"pid": os.getpid(), "id": os.environ["JOBRUNNER_JOB_ID"],
            "attempt": os.environ["JOBRUNNER_ATTEMPT"], "leaked": os.environ.get("LEAKED"),
            "home": "HOME" in os.environ, "cwd": os.getcwd(), "nowhere": "/nowhere" in sys.path}

def untidy(what):
    """Return, leaving what a worker cannot undo."""
    if what == "thread":
        import threading
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    elif what == "atexit":
        import atexit
        atexit.register(print, "atexit ran")
    elif what == "signal":
        import signal
        signal.signal(signal.SIGUSR1, lambda *a: None)
    elif what == "alarm":               # would end the next attempt on this worker
        import signal
        signal.setitimer(signal.ITIMER_REAL, 1.5)
    elif what == "sigmask":             # would make the next attempt's timeout wait kill_grace
        import signal
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    elif what == "nice":
        os.nice(5)
    elif what == "rlimit":
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(64, soft), hard))
    return os.getpid()

def boom():
    raise RuntimeError("boom")

def quit_hard():
    os._exit(3)

def sleeper(seconds):
    time.sleep(seconds)

def hold(flag):
    while not os.path.exists(flag):
        time.sleep(0.01)
    return os.getpid()

def leave(mode, tag):
    """Start a child that would sleep a minute, in our group or a session of its own, or as a
    double fork (its parent exits at once); return its pid without waiting for it."""
    code = "import time; time.sleep(60)  # " + tag
    if mode == "double":
        code = ("import os, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', %r],"
                " start_new_session=True, stdout=subprocess.DEVNULL,"
                " stderr=subprocess.DEVNULL); print(p.pid, flush=True)" % code)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        return {"worker": os.getpid(), "child": int(out.stdout)}
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=mode == "setsid")
    return {"worker": os.getpid(), "child": child.pid}

def escape(tag, how):
    """Leave a child in a session of its own, then return or exit."""
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # " + tag],
                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if how == "exit":
        os._exit(1)

def burst(tag):
    """A short job; every third one leaves a child behind in a session of its own."""
    if int(os.environ["JOBRUNNER_JOB_ID"]) % 3 == 0:
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # " + tag],
                         start_new_session=True)
    time.sleep(0.05)
    return os.getpid()
'''

ALLOW = ["examples.*:*", "testjobs_reuse:*"]


def alive(pid: int) -> bool:
    """Is `pid` a live process (not gone, not a zombie)?"""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def proc_stat(pid: int):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def processes_with(word: str) -> list[int]:
    """Live processes whose command line holds `word`."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open("/proc/%s/cmdline" % name, "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if word.encode() in cmdline and alive(int(name)):
                found.append(int(name))
    return found


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (its children, theirs, ...)."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for name in os.listdir("/proc"):
            stat = proc_stat(int(name)) if name.isdigit() else None
            if stat is not None and int(stat[1]) == parent and int(name) not in found:
                found.add(int(name))
                todo.append(int(name))
    return found


class ReuseTestCase(DaemonTestCase):
    config = {"isolation": "reuse", "workers": 1, "allow": ALLOW, "kill_grace": 0.5}

    def prepare(self):
        self.write_job_module("testjobs_reuse", JOB_MODULE)

    def tag(self, what: str) -> str:
        """A word for the command lines of this test's job children; any left at the end of
        the test (it failed) are killed then."""
        tag = "jr-reuse-%s-%s" % (what, self.root)
        self.addCleanup(lambda: [os.kill(pid, signal.SIGKILL) for pid in processes_with(tag)])
        return tag

    def run_job(self, target, **fields):
        job = self.daemon.wait_job(self.daemon.add(target, **fields), timeout=20)
        return job

    def result(self, target, **fields):
        job = self.run_job(target, **fields)
        self.assertEqual(job["state"], "succeeded", job)
        return job["result"]

    def imports(self) -> list[str]:
        with open(os.path.join(self.root, "jobs", "imports.log")) as f:
            return f.read().split()


class PerAttemptTest(ReuseTestCase):

    def test_two_jobs_on_one_worker_keep_their_own_env_output_and_result(self):
        a_id = self.daemon.add("testjobs_reuse:env_a")
        b_id = self.daemon.add("testjobs_reuse:env_b")
        a, b = self.daemon.wait_job(a_id), self.daemon.wait_job(b_id)
        self.assertEqual((a["state"], b["state"]), ("succeeded", "succeeded"), (a, b))
        self.assertEqual(a["result"]["pid"], b["result"]["pid"], "not the same worker")
        self.assertEqual(a["result"]["id"], str(a_id))
        cwd = b["result"].pop("cwd")
        self.assertEqual(b["result"], {"pid": a["result"]["pid"], "id": str(b_id),
                                       "attempt": "1", "leaked": None, "home": True,
                                       "nowhere": False})
        self.assertEqual(cwd, os.readlink("/proc/%d/cwd" % self.daemon.proc.pid),
                         "job A's chdir was kept")
        out_a = self.daemon.call(op="output", id=a_id)["data"]
        out_b = self.daemon.call(op="output", id=b_id)["data"]
        self.assertEqual(support.job_output(out_a), "output of A\n")
        self.assertEqual(support.job_output(out_b), "output of B\n")
        self.assertIn("attempt 1/1 succeeded", out_b)
        # The worker leads its own group, and is not the daemon.
        pid = a["result"]["pid"]
        self.assertNotEqual(pid, self.daemon.proc.pid)
        self.assertEqual(os.getpgid(pid), pid)

    def test_a_module_is_imported_once_per_worker(self):
        pids = {self.result("testjobs_reuse:who") for _ in range(5)}
        self.assertEqual(len(pids), 1, pids)
        self.assertEqual(self.imports(), [str(pids.pop())])


class ReplacementTest(ReuseTestCase):
    config = dict(ReuseTestCase.config, queues={"three": {"isolation": "reuse",
                                                          "max_jobs_per_worker": 3}})

    def test_a_timeout_replaces_the_worker(self):
        first = self.result("testjobs_reuse:who")
        job = self.run_job("testjobs_reuse:sleeper", args=[30], timeout=0.5)
        self.assertEqual(job["state"], "failed")
        self.assertIn("timed out", job["error"])
        wait_until(lambda: not alive(first), 10, message="the timed-out worker to be gone")
        self.assertNotEqual(self.result("testjobs_reuse:who"), first)

    def test_a_failure_replaces_the_worker(self):
        first = self.result("testjobs_reuse:who")
        job = self.run_job("testjobs_reuse:boom")
        self.assertEqual((job["state"], job["error"]), ("failed", "RuntimeError: boom"))
        second = self.result("testjobs_reuse:who")
        self.assertNotEqual(second, first)
        job = self.run_job("testjobs_reuse:quit_hard")      # os._exit(): failed, as fresh
        self.assertEqual((job["state"], job["exit_code"]), ("failed", 3))
        self.assertNotIn(self.result("testjobs_reuse:who"), (first, second))
        self.assertEqual(len(self.imports()), 3, "one import per worker")

    def test_a_worker_goes_after_an_attempt_that_left_what_it_cannot_undo(self):
        for what in ("thread", "atexit", "signal", "sigmask", "nice", "rlimit"):
            with self.subTest(what=what):
                job_id = self.daemon.add("testjobs_reuse:untidy", args=[what])
                job = self.daemon.wait_job(job_id)
                self.assertEqual(job["state"], "succeeded", job)
                wait_until(lambda: not alive(job["result"]), 10, message="the worker to go")
                self.assertNotEqual(self.result("testjobs_reuse:who"), job["result"])
                if what == "atexit":        # run at the attempt's end, as a fresh exit runs it
                    out = self.daemon.call(op="output", id=job_id)["data"]
                    self.assertEqual(support.job_output(out), "atexit ran\n")

    def test_an_alarm_one_attempt_left_never_ends_the_next(self):
        left = self.run_job("testjobs_reuse:untidy", args=["alarm"])    # due in 1.5 s
        self.assertEqual(left["state"], "succeeded", left)
        job = self.run_job("testjobs_reuse:sleeper", args=[2])
        self.assertEqual(job["state"], "succeeded", job)

    def test_max_jobs_per_worker(self):
        pids = [self.result("testjobs_reuse:who", queue="three") for _ in range(4)]
        self.assertEqual(len(set(pids[:3])), 1, pids)
        self.assertNotEqual(pids[3], pids[0])
        wait_until(lambda: not alive(pids[0]), 10, message="the retired worker to exit")

    def test_sighup_replaces_workers_a_busy_one_after_its_attempt(self):
        self.assertEqual(self.result("testjobs_reuse:version")[0], 1)
        first = self.result("testjobs_reuse:who")
        flag = os.path.join(self.root, "flag")
        busy = self.daemon.add("testjobs_reuse:hold", args=[flag])
        self.daemon.wait_state(busy, "running")
        self.daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: any(e["event"] == "reload" for e in self.daemon.events()), 10,
                   message="the reload")
        self.assertTrue(alive(first), "the busy worker was not let finish")
        self.write_job_module("testjobs_reuse", JOB_MODULE.replace("VERSION = 1", "VERSION = 22"))
        open(flag, "w").close()
        job = self.daemon.wait_job(busy)
        self.assertEqual((job["state"], job["result"]), ("succeeded", first))
        wait_until(lambda: not alive(first), 10, message="the old worker to exit")
        version, pid = self.result("testjobs_reuse:version")
        self.assertNotEqual(pid, first)
        self.assertEqual(version, 22, "the new worker runs the old job code")

    def test_set_workers_down_stops_extra_idle_workers(self):
        self.daemon.call(op="set_workers", queue="default", workers=2)
        flags = [os.path.join(self.root, "flag%d" % i) for i in range(2)]
        ids = [self.daemon.add("testjobs_reuse:hold", args=[flag]) for flag in flags]
        for job_id in ids:
            self.daemon.wait_state(job_id, "running")
        for flag in flags:
            open(flag, "w").close()
        pids = {self.daemon.wait_job(job_id)["result"] for job_id in ids}
        self.assertEqual(len(pids), 2)
        self.assertTrue(all(alive(pid) for pid in pids))
        reply = self.daemon.call(op="set_workers", queue="default", workers=1)
        self.assertEqual(reply["queue"]["isolation"], "reuse")
        wait_until(lambda: sum(alive(pid) for pid in pids) == 1, 10,
                   message="one idle worker to stop")


class LimitsTest(ReuseTestCase):
    config = dict(ReuseTestCase.config, limits={"cpu": 1, "nofile": 200})

    def test_cpu_counts_per_attempt_the_rest_per_worker(self):
        self.assertEqual(self.run_job("testjobs_reuse:burn", args=[1.1])["state"], "succeeded")
        got = self.result("testjobs_reuse:limits")
        self.assertGreater(got["used"], 1.0, "not the worker that burnt")
        # A whole second for this attempt, on top of what the worker used before it.
        self.assertGreaterEqual(got["cpu"] - got["used"], 1.0, got)
        self.assertEqual(got["nofile"], [200, 200])


class SpawnTest(ReuseTestCase):
    config = dict(ReuseTestCase.config, start_method="spawn")

    def test_without_a_zygote_attempts_run_fresh(self):
        first, second = (self.result("testjobs_reuse:who") for _ in range(2))
        self.assertNotEqual(first, second)


class LeftoversTest(ReuseTestCase):

    def test_what_an_attempt_leaves_is_gone_before_the_next_one(self):
        for mode in ("group", "setsid", "double"):
            with self.subTest(mode=mode):
                tag = self.tag("leftover-" + mode)
                got = self.result("testjobs_reuse:leave", args=[mode, tag])
                # Gone once the attempt is over, not some time later: the worker kills and
                # reaps what it left before it says so.
                self.assertEqual(processes_with(tag), [], "left behind (%s)" % mode)
                self.assertFalse(alive(got["child"]))
                self.assertTrue(alive(got["worker"]), "the worker itself was killed")
        self.assertEqual(len({self.result("testjobs_reuse:who")} | {got["worker"]}), 1)


class CrashCase:
    """SIGKILL of the daemon during a burst of short jobs: restart, every acknowledged job is
    there and ends, and no process of the old daemon's attempts is left."""

    isolation = "fresh"

    def test_sigkill_during_a_burst(self):
        tag = self.tag("crash")
        ids = []
        with self.daemon.raw() as c:
            for _ in range(40):
                reply = c.call(op="add", target="testjobs_reuse:burst", args=[tag], retries=3,
                               retry_delay=0.01)
                self.assertTrue(reply["ok"], reply)
                ids.append(reply["id"])

        def under_way():
            done = sum(self.daemon.get(i)["state"] == "succeeded" for i in ids)
            return done >= 6 and processes_with(tag)
        wait_until(under_way, 20, message="the burst to be under way")
        before = descendants(self.daemon.proc.pid)
        self.assertTrue(before)
        self.daemon.kill()
        self.daemon.start()
        for job_id in ids:
            job = self.daemon.wait_job(job_id, timeout=30)
            self.assertEqual(job["state"], "succeeded", job)
        # Nothing of the old daemon's attempts (its zygote, workers, their children) is left.
        # The new daemon's attempts are over too: what they left is gone as well.
        wait_until(lambda: not any(alive(p) for p in before), 10,
                   message="the old daemon's processes to be gone")
        wait_until(lambda: not processes_with(tag), 10, message="no leftover job child")
        if self.isolation == "reuse":
            pids = {self.daemon.get(i)["result"] for i in ids}
            self.assertLess(len(pids), len(ids) // 2, "workers were not reused")


class EndedCrashCase:
    """SIGKILL of the daemon right after the write that ended an attempt, before the daemon
    swept what the attempt left: the restart kills it (it is of an attempt that is over)."""

    how = "return"

    # No sweep: the crash comes before it (a sweep runs in the pass after the attempt's end
    # at the earliest when others ended just before: SWEEP_SPACING).
    daemon_preamble = support.kill_after_commit(
        "jr.Containment.schedule = lambda self, delay=0.0: None",
        "self.jobs.counts[jr.SUCCEEDED] + self.jobs.counts[jr.FAILED] >= 1")

    def test_a_crash_between_an_attempts_end_and_its_sweep(self):
        tag = self.tag("ended")
        job_id = self.daemon.add("testjobs_reuse:escape", args=[tag, self.how])
        self.daemon.proc.wait(timeout=20)
        self.daemon.stderr.close()
        self.assertTrue(processes_with(tag), "the crash came too late: nothing to find")
        self.daemon.preamble = None
        self.daemon.start()
        self.assertEqual(processes_with(tag), [], "start-up let a leftover live")
        self.assertEqual(self.daemon.get(job_id)["state"],
                         "succeeded" if self.how == "return" else "failed")


class FreshEndedCrashTest(EndedCrashCase, ReuseTestCase):
    config = dict(ReuseTestCase.config, isolation="fresh")


class ReuseEndedCrashTest(EndedCrashCase, ReuseTestCase):
    how = "exit"                # a reused worker kills what a returning attempt left itself


class ReuseCrashTest(CrashCase, ReuseTestCase):
    config = dict(ReuseTestCase.config, workers=2)
    isolation = "reuse"


class FreshCrashTest(CrashCase, ReuseTestCase):
    config = dict(ReuseTestCase.config, workers=2, isolation="fresh")


if __name__ == "__main__":
    unittest.main()
