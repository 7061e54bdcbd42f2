"""Both ways of starting an attempt: the zygote (fork server, the default) and spawn.

The same core scenario runs under each start method; then what only the zygote has: its death
does not lose jobs, SIGHUP makes it pick up changed job code, `preload` is imported once, and
no job process outlives a SIGKILLed daemon.
"""
import os
import signal
import sys
import unittest

from tests import support
from tests.support import DaemonTestCase, children_named, wait_until

JOB_MODULE = '''
import os, sys, time

def version():
    return VERSION

def who():
    return {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0),
            "stdin": os.readlink("/proc/self/fd/0"), "attempt": os.environ["JOBRUNNER_ATTEMPT"],
            "preloaded": "testjobs_preload" in sys.modules,
            "paths": [p for p in sys.path if p.endswith("jobs")],
            "executable": sys.executable, "isolated": sys.flags.isolated}

def flaky(marker):
    """Fails the first time (no marker file yet), succeeds the second."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first attempt fails")
    print("second attempt", flush=True)
    return "ok"

def environment():
    return dict(os.environ)

def hold(flag):
    """Runs until `flag` exists."""
    print(os.getpid(), flush=True)
    while not os.path.exists(flag):
        time.sleep(0.01)
    return "released"

def sleeper(seconds):
    print(os.getpid(), flush=True)
    time.sleep(seconds)
'''


def expected_job_env(daemon_pid: int, job_id: int) -> dict:
    """The daemon's environment without systemd's variables, plus the job's own two."""
    with open("/proc/%d/environ" % daemon_pid, "rb") as f:
        pairs = [item.decode().split("=", 1) for item in f.read().split(b"\0") if item]
    env = {k: v for k, v in pairs
           if k != "NOTIFY_SOCKET" and not k.startswith(("LISTEN_", "WATCHDOG_"))}
    env.update(JOBRUNNER_JOB_ID=str(job_id), JOBRUNNER_ATTEMPT="1")
    return env


class CoreScenario:
    """Mixed into a DaemonTestCase with a given start_method."""

    def setUp(self):
        super().setUp()
        self.write_job_module("testjobs_sm", "VERSION = 1\n" + JOB_MODULE)

    def test_result_environment_and_isolation(self):
        job = self.daemon.wait_job(self.daemon.add("testjobs_sm:who"))
        self.assertEqual(job["state"], "succeeded", job)
        info = job["result"]
        self.assertEqual(info["pid"], info["pgid"], "each attempt leads its own process group")
        self.assertEqual(info["stdin"], "/dev/null")
        self.assertEqual(info["attempt"], "1")
        self.assertNotEqual(info["ppid"], os.getpid())
        # The daemon's own interpreter (never `python3` from PATH), isolated (-I).
        self.assertEqual(os.path.realpath(info["executable"]), os.path.realpath(sys.executable))
        self.assertEqual(info["isolated"], 1)

    def test_the_job_environment_is_the_daemons_plus_its_ids(self):
        job_id = self.daemon.add("testjobs_sm:environment")
        job = self.daemon.wait_job(job_id)
        self.assertEqual(job["state"], "succeeded", job)
        self.assertEqual(job["result"], expected_job_env(self.daemon.proc.pid, job_id))

    def test_retry_then_success_with_output(self):
        marker = os.path.join(self.root, "marker")
        job_id = self.daemon.add("testjobs_sm:flaky", args=[marker], retries=1, retry_delay=0.05)
        job = self.daemon.wait_job(job_id)
        self.assertEqual((job["state"], job["attempts"], job["result"]), ("succeeded", 2, "ok"))
        self.assertEqual(support.job_output(self.daemon.call(op="output", id=job_id)["data"]),
                         "second attempt\n")

    def test_timeout_kills_the_attempt(self):
        job_id = self.daemon.add("testjobs_sm:sleeper", args=[60], timeout=2)
        job = self.daemon.wait_job(job_id)
        self.assertEqual(job["state"], "failed")
        self.assertIn("timed out", job["error"])
        # The pid from the log: the output is empty if the kill came before the job printed.
        pid = int(self.daemon.job_events(job_id, "started")[0]["pid"])
        wait_until(lambda: not process_alive(pid), 10, message="the timed-out job to be gone")


class ZygoteCoreTest(CoreScenario, DaemonTestCase):
    config = {"start_method": "zygote", "allow": ["examples.*:*", "testjobs*:*"],
              "kill_grace": 0.5}


class SpawnCoreTest(CoreScenario, DaemonTestCase):
    config = {"start_method": "spawn", "allow": ["examples.*:*", "testjobs*:*"],
              "kill_grace": 0.5}


class ZygoteTest(DaemonTestCase):
    config = {"start_method": "zygote", "allow": ["examples.*:*", "testjobs*:*"],
              "kill_grace": 0.5, "preload": ["testjobs_preload", "testjobs_sm"]}

    def prepare(self):
        self.write_job_module("testjobs_preload", "import os\nos.environ['PRELOAD_LEAK'] = '1'\n"
                                                  "LOADED = True\n")
        self.write_job_module("testjobs_sm", "VERSION = 1\n" + JOB_MODULE)

    def zygote_pids(self):
        """The daemon's children whose command line names the zygote."""
        return children_named(self.daemon.proc.pid, b"jobrunner-zygote")

    def test_preloaded_code_changes_on_sighup_only(self):
        self.assertEqual(self.daemon.wait_job(self.daemon.add("testjobs_sm:version"))["result"], 1)
        self.write_job_module("testjobs_sm", "VERSION = 2  # changed\n" + JOB_MODULE)
        self.assertEqual(self.daemon.wait_job(self.daemon.add("testjobs_sm:version"))["result"], 1,
                         "the zygote imported it once: the change waits for SIGHUP")
        before = self.zygote_pids()
        self.daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: self.zygote_pids() and self.zygote_pids() != before, 10,
                   message="a new zygote after SIGHUP")
        self.assertEqual(self.daemon.wait_job(self.daemon.add("testjobs_sm:version"))["result"], 2)

    def test_running_job_survives_sighup_and_its_old_zygote_then_goes(self):
        flag = os.path.join(self.root, "release")
        job_id = self.daemon.add("testjobs_sm:hold", args=[flag])
        self.daemon.wait_state(job_id, "running")
        wait_until(lambda: self.daemon.call(op="output", id=job_id)["data"], 10,
                   message="the job to print its pid")
        [old] = self.zygote_pids()
        self.daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(self.zygote_pids()) == 2, 10,
                   message="a new zygote beside the old one, which still has the job")
        self.assertTrue(process_alive(old))
        self.assertEqual(self.daemon.get(job_id)["state"], "running")
        open(flag, "w").close()
        job = self.daemon.wait_job(job_id)
        self.assertEqual((job["state"], job["result"]), ("succeeded", "released"), job)
        wait_until(lambda: self.zygote_pids() and old not in self.zygote_pids(), 10,
                   message="the old zygote to exit once its job is over")
        self.assertEqual(len(self.zygote_pids()), 1)

    def test_zygote_death_fails_the_attempt_and_the_next_one_runs(self):
        job_id = self.daemon.add("testjobs_sm:sleeper", args=[60], retries=1, retry_delay=0.05)
        self.daemon.wait_state(job_id, "running")
        job_pid = int(wait_until(lambda: support.job_output(
            self.daemon.call(op="output", id=job_id)["data"]),
            10, message="the job to print its pid").split()[0])
        [zygote] = self.zygote_pids()
        os.kill(zygote, signal.SIGKILL)
        wait_until(lambda: not process_alive(job_pid), 10, message="the job to die with the zygote")
        job = wait_until(lambda: (lambda j: j["attempts"] == 2 and j["state"] == "running" and j)(
            self.daemon.get(job_id)), 15, message="the second attempt to run")
        self.assertNotEqual(job["pid"], job_pid)
        self.daemon.call(op="cancel", id=job_id)
        done = self.daemon.wait_job(self.daemon.add("testjobs_sm:version"))
        self.assertEqual(done["state"], "succeeded", "a new zygote serves later jobs")

    def test_environment_changes_made_by_preload_do_not_reach_jobs(self):
        job_id = self.daemon.add("testjobs_sm:environment")
        env = self.daemon.wait_job(job_id)["result"]
        self.assertNotIn("PRELOAD_LEAK", env)
        self.assertEqual(env, expected_job_env(self.daemon.proc.pid, job_id))

    def test_preload_is_imported_by_the_zygote(self):
        result = self.daemon.wait_job(self.daemon.add("testjobs_sm:who"))["result"]
        self.assertTrue(result["preloaded"])
        self.assertTrue(result["paths"], "job_paths are on sys.path")

    def test_sigkilled_daemon_leaves_no_job_process(self):
        job_id = self.daemon.add("testjobs_sm:sleeper", args=[60])
        self.daemon.wait_state(job_id, "running")
        job_pid = int(wait_until(lambda: support.job_output(
            self.daemon.call(op="output", id=job_id)["data"]),
            10, message="the job to print its pid").split()[0])
        zygotes = self.zygote_pids()
        self.daemon.kill()
        for pid in zygotes + [job_pid]:
            wait_until(lambda: not process_alive(pid), 10,
                       message="process %d to die with the daemon" % pid)


def process_alive(pid):
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


if __name__ == "__main__":
    unittest.main()
