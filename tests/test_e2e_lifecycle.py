"""The daemon's life, end to end (SPEC §2, §3a, §5, §6): restarts keep every job and the id
counter, pause survives a restart, a graceful stop interrupts or lets finish the running attempts,
a SIGKILL crash leaves no orphan and loses no acknowledged job, the state lock and the socket keep
a second daemon out, damaged state refuses start-up without touching the file, --check-config, and
prune.

Each test runs a real jobrunnerd in its own temp dir (tests/support.py). Nothing here sleeps to
synchronise: tests poll with deadlines, use the daemon's `wait` op, or let a job block on a flag
file that the test creates when it wants the job to go on.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from tests.support import DAEMON, Daemon, DaemonTestCase, toml_value, wait_until

# A job module in the test's own job path. `hold` blocks until the test creates `flag`, so the
# test decides when an attempt may end; it reports the attempt number the daemon gave it.
JOB_MODULE = "lifecycle_jobs"
JOB_SOURCE = '''
import os, subprocess, sys, time

def hold(flag, grandchild=False, limit=120):
    attempt = os.environ.get("JOBRUNNER_ATTEMPT")
    print("attempt", attempt, flush=True)
    if grandchild and not os.path.exists(flag):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print("grandchild", child.pid, flush=True)
    deadline = time.monotonic() + limit
    while not os.path.exists(flag):
        if time.monotonic() > deadline:
            raise RuntimeError("flag never appeared")
        time.sleep(0.02)
    return {"attempt": attempt}
'''
HOLD = JOB_MODULE + ":hold"
LATER = 3600            # a delay that keeps a job pending for the whole test


def alive(pid):
    """True while `pid` is a live process (a zombie nobody reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2:].split()[0] not in (b"Z", b"X")


class LifecycleCase(DaemonTestCase):
    config = {"allow": ["examples.*:*", JOB_MODULE + ":*"], "kill_grace": 1,
              "shutdown_grace": 1}

    def setUp(self):
        super().setUp()
        self.write_job_module(JOB_MODULE, JOB_SOURCE)

    # -- helpers -------------------------------------------------------------------------

    def restart(self, sig=signal.SIGTERM):
        """Stop the daemon with `sig` and start it again on the same dirs."""
        rc = self.daemon.stop(sig)
        if sig == signal.SIGKILL:
            self.assertEqual(rc, -signal.SIGKILL)
        else:
            self.assertEqual(rc, 0, "graceful stop must exit 0: " + self.daemon.read_stderr())
        self.daemon.start()

    def flag(self, name="flag"):
        return os.path.join(self.root, name)

    def touch(self, path):
        with open(path, "w"):
            pass

    def output(self, job_id):
        reply = self.daemon.call(op="output", id=job_id, offset=0)
        self.assertTrue(reply["ok"], reply)
        return reply["data"]

    def wait_output(self, job_id, text, timeout=20.0):
        return wait_until(lambda: text in self.output(job_id) and self.output(job_id), timeout,
                          message="job %d to print %r" % (job_id, text))

    def assert_not_found(self, job_id):
        reply = self.daemon.call(op="get", id=job_id)
        self.assertFalse(reply["ok"], reply)
        self.assertEqual(reply["error"]["code"], "not_found")

    def assert_gone(self, pid, what, timeout=15.0):
        wait_until(lambda: not alive(pid), timeout, message="%s (pid %d) to be gone" % (what, pid))

    def state_bytes(self):
        """queue.json and journal.jsonl as they are on disk now."""
        out = {}
        for name in ("queue.json", "journal.jsonl"):
            path = os.path.join(self.daemon.state_dir, name)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    out[name] = f.read()
        return out

    def start_must_fail(self, daemon):
        """Start `daemon` without waiting; it must exit on its own. Returns (rc, new stderr)."""
        before = len(daemon.read_stderr())
        daemon.start(wait=False)
        try:
            rc = daemon.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()
            self.fail("the daemon started although it must refuse: " + daemon.read_stderr())
        finally:
            daemon.stderr.close()
        return rc, daemon.read_stderr()[before:]

    def other_daemon(self, root, **config):
        """A second fixture daemon; its own config and stderr files under `root`."""
        d = Daemon(root, **config)
        d.config_path = os.path.join(root, "other.toml")
        d.stderr_path = os.path.join(root, "other.stderr")

        def cleanup():
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
        self.addCleanup(cleanup)
        return d


####################################################################################################
#  Restart: jobs, states, fields and the id counter survive
####################################################################################################

class RestartTest(LifecycleCase):

    def test_restart_keeps_every_job_and_field(self):
        d = self.daemon
        a = d.add("examples.jobs:ExampleJob", args=["a", 1, {"k": [True, None]}])
        b = d.add("examples.jobs:ErrorJob", retries=0)
        c = d.add("examples.jobs:echo", args=[1, "two"], kwargs={"x": {"y": 1}}, priority=7,
                  delay=LATER, key="key-c", retries=2, retry_delay=0.5, backoff="fixed",
                  timeout=12.5)
        e = d.add("examples.jobs:DelayedJob", delay=LATER)
        f = d.add("examples.jobs:echo", run_at=time.time() + 7200, timeout=None)
        self.assertEqual(d.wait_job(a)["state"], "succeeded")
        self.assertEqual(d.wait_job(b)["state"], "failed")
        self.assertTrue(d.call(op="cancel", id=e)["ok"])
        before = {i: d.get(i) for i in (a, b, c, e, f)}
        self.assertEqual(before[a]["result"], {"params": ["a", 1, {"k": [True, None]}]})
        self.assertEqual([before[i]["state"] for i in (a, b, c, e, f)],
                         ["succeeded", "failed", "pending", "cancelled", "pending"])

        self.restart(signal.SIGTERM)
        self.assertTrue(os.path.exists(os.path.join(d.state_dir, "queue.json")))
        for i, job in before.items():
            self.assertEqual(d.get(i), job, "job %d changed across a clean restart" % i)
        # the key is still held by the pending job
        self.assertEqual(d.call(op="add", target="examples.jobs:echo", key="key-c"),
                         {"ok": True, "id": c, "created": False})
        g = d.add("examples.jobs:echo", delay=LATER)
        self.assertEqual(g, f + 1)
        before[g] = d.get(g)

        self.restart(signal.SIGKILL)            # this time from the journal
        for i, job in before.items():
            self.assertEqual(d.get(i), job, "job %d changed across a crash restart" % i)
        self.assertEqual(d.add("examples.jobs:echo", delay=LATER), g + 1)
        listed = d.call(op="list")["jobs"]
        self.assertEqual([j["id"] for j in listed], [a, b, c, e, f, g, g + 1])

    def test_sigint_is_a_graceful_stop(self):
        d = self.daemon
        job_id = d.add("examples.jobs:echo", args=["int"], delay=LATER)
        self.assertEqual(d.stop(signal.SIGINT), 0, d.read_stderr())
        self.assertTrue(os.path.exists(os.path.join(d.state_dir, "queue.json")))
        self.assertEqual([e["event"] for e in d.events()][-1], "shutdown")
        d.start()
        self.assertEqual(d.get(job_id)["args"], ["int"])

    def test_ids_never_reused_after_pruning_the_highest(self):
        d = self.daemon
        ids = [d.add("examples.jobs:ExampleJob", args=[n]) for n in range(3)]
        self.assertEqual(ids, [1, 2, 3])
        for i in ids:
            self.assertEqual(d.wait_job(i)["state"], "succeeded")
        self.assertEqual(d.call(op="prune"), {"ok": True, "removed": 3})
        self.assertEqual(d.call(op="list")["jobs"], [])

        self.restart(signal.SIGTERM)
        four = d.add("examples.jobs:ExampleJob")
        self.assertEqual(four, 4)
        d.wait_job(four)
        self.assertEqual(d.call(op="prune")["removed"], 1)

        self.restart(signal.SIGKILL)
        self.assertEqual(d.add("examples.jobs:ExampleJob"), 5)
        self.assert_not_found(4)

    def test_pause_is_kept_across_restarts(self):
        d = self.daemon
        self.assertEqual(d.call(op="pause"), {"ok": True, "paused": True})
        one = d.add("examples.jobs:ExampleJob", args=["one"])

        self.restart(signal.SIGTERM)
        self.assertTrue(d.call(op="stats")["paused"])
        reply = d.call(op="wait", id=one, timeout=0.5)
        self.assertFalse(reply["done"], reply)
        self.assertEqual(reply["job"]["state"], "pending")
        self.assertEqual(reply["job"]["attempts"], 0)
        self.assertEqual(d.call(op="resume"), {"ok": True, "paused": False})
        self.assertEqual(d.wait_job(one)["state"], "succeeded")

        self.assertTrue(d.call(op="pause")["ok"])       # now only in the journal
        two = d.add("examples.jobs:ExampleJob", args=["two"])
        self.restart(signal.SIGKILL)
        self.assertTrue(d.call(op="stats")["paused"])
        reply = d.call(op="wait", id=two, timeout=0.5)
        self.assertFalse(reply["done"], reply)
        self.assertTrue(d.call(op="resume")["ok"])
        self.assertEqual(d.wait_job(two)["state"], "succeeded")

        self.restart(signal.SIGKILL)                    # resume is kept as well
        self.assertFalse(d.call(op="stats")["paused"])


####################################################################################################
#  Graceful stop
####################################################################################################

class GracefulStopInterruptsTest(LifecycleCase):
    config = dict(LifecycleCase.config, shutdown_grace=0.5)

    def test_running_attempt_is_interrupted_and_not_counted(self):
        d = self.daemon
        flag = self.flag()
        job_id = d.add(HOLD, args=[flag], retries=2)
        self.wait_output(job_id, "attempt 1")
        self.assertEqual(d.get(job_id)["attempts"], 1)
        self.assertTrue(d.call(op="pause")["ok"])       # so it stays pending after the restart

        self.assertEqual(d.stop(signal.SIGTERM), 0, d.read_stderr())
        self.assertTrue(os.path.exists(os.path.join(d.state_dir, "queue.json")),
                        "a cleanly stopped daemon leaves a queue.json")
        interrupted = self.daemon.job_events(job_id, "interrupted")
        self.assertEqual(len(interrupted), 1, self.daemon.job_events(job_id))
        self.assertEqual(interrupted[0].get("attempt"), "1/3")
        self.assertEqual(self.daemon.job_events(job_id, "retrying"), [])
        self.assertEqual(self.daemon.job_events(job_id, "failed"), [])
        events = [e["event"] for e in d.events()]
        self.assertEqual(events[-1], "shutdown")

        d.start()
        job = d.get(job_id)
        self.assertEqual(job["state"], "pending")
        self.assertEqual(job["attempts"], 0, "an interrupted attempt is not counted")
        self.touch(flag)
        self.assertTrue(d.call(op="resume")["ok"])
        job = d.wait_job(job_id)
        self.assertEqual(job["state"], "succeeded")
        self.assertEqual(job["attempts"], 1)
        self.assertEqual(job["result"], {"attempt": "1"},
                         "the next attempt carries the same JOBRUNNER_ATTEMPT")
        self.assertEqual([e.get("attempt") for e in self.daemon.job_events(job_id, "started")],
                         ["1/3", "1/3"])


class GracefulStopWaitsTest(LifecycleCase):
    config = dict(LifecycleCase.config, shutdown_grace=30)

    def test_attempt_finishing_within_grace_succeeds(self):
        d = self.daemon
        flag = self.flag()
        job_id = d.add(HOLD, args=[flag])
        self.wait_output(job_id, "attempt 1")
        d.proc.send_signal(signal.SIGTERM)

        def stopping():     # the daemon has taken the signal: changes are refused now
            reply = d.call(op="add", target="examples.jobs:echo", delay=LATER)
            return not reply["ok"] and reply["error"]["code"] == "shutting_down"
        wait_until(stopping, 15, message="the daemon to refuse changes while stopping")
        self.assertIsNone(d.proc.poll(), "the daemon must wait for the running attempt")
        self.touch(flag)
        try:                                    # no second signal: that would cut the grace
            rc = d.proc.wait(timeout=30)
        finally:
            d.stderr.close()
        self.assertEqual(rc, 0, d.read_stderr())

        names = [(e["event"], e.get("job")) for e in d.events()]
        self.assertIn(("succeeded", str(job_id)), names)
        self.assertLess(names.index(("succeeded", str(job_id))),
                        names.index(("shutdown", None)))
        self.assertEqual(self.daemon.job_events(job_id, "interrupted"), [])
        d.start()
        job = d.get(job_id)
        self.assertEqual(job["state"], "succeeded")
        self.assertEqual(job["attempts"], 1)
        self.assertEqual(job["result"], {"attempt": "1"})


####################################################################################################
#  SIGKILL: orphans are killed, interrupted attempts retried or failed, acknowledged jobs kept
####################################################################################################

class CrashTest(LifecycleCase):
    config = dict(LifecycleCase.config, shutdown_grace=0.5)

    def running_with_grandchild(self, target, args, **fields):
        """Add a job that starts a grandchild; return (id, job pid, grandchild pid)."""
        job_id = self.daemon.add(target, args=args, **fields)
        def grandchild_pid():   # "PID" (spawn_grandchild) or "grandchild PID" (hold)
            found = re.search(r"^(?:grandchild )?(\d+)$", self.output(job_id), re.M)
            return found and int(found.group(1))
        grandchild = wait_until(grandchild_pid, 20, message="the grandchild's pid in the output")
        pid = self.daemon.get(job_id)["pid"]
        self.assertIsInstance(pid, int)
        self.assertNotEqual(grandchild, pid)
        return job_id, pid, grandchild

    def test_crash_kills_leftovers_and_retries(self):
        d = self.daemon
        flag = self.flag()
        job_id, pid, grandchild = self.running_with_grandchild(
            HOLD, [flag, True], retries=1, retry_delay=0.2, backoff="fixed")
        d.kill()
        self.assertTrue(alive(grandchild), "the grandchild outlives a SIGKILLed daemon by itself")

        d.start()
        self.assert_gone(pid, "the job process")
        self.assert_gone(grandchild, "the grandchild")
        interrupted = self.daemon.job_events(job_id, "interrupted")
        self.assertEqual(len(interrupted), 1, self.daemon.job_events(job_id))
        self.assertEqual(interrupted[0].get("attempt"), "1/2")
        self.touch(flag)
        job = d.wait_job(job_id)
        self.assertEqual(job["state"], "succeeded", job)
        self.assertEqual(job["attempts"], 2)
        self.assertEqual(job["result"], {"attempt": "2"})
        self.assertEqual([e.get("attempt") for e in self.daemon.job_events(job_id, "started")],
                         ["1/2", "2/2"])

    def test_crash_without_retries_left_fails_the_job(self):
        d = self.daemon
        job_id, pid, grandchild = self.running_with_grandchild(
            "examples.jobs:spawn_grandchild", [60], retries=0)
        d.kill()
        self.assertTrue(alive(grandchild))

        d.start()
        self.assert_gone(pid, "the job process")
        self.assert_gone(grandchild, "the grandchild")
        job = d.get(job_id)
        self.assertEqual(job["state"], "failed")
        self.assertEqual(job["attempts"], 1)
        self.assertIsNone(job["pid"])
        self.assertIsNotNone(job["finished_at"])
        events = self.daemon.job_events(job_id)
        self.assertEqual(len([e for e in events if e["event"] == "interrupted"]), 1, events)
        self.assertEqual(len([e for e in events if e["event"] == "failed"]), 1, events)

    def test_acknowledged_jobs_survive_sigkill(self):
        d = self.daemon
        acked = {}
        for round_ in range(3):
            before = set(acked)
            with d.raw() as c:                  # pipelined: ack after ack, then kill at once
                for n in range(12):
                    fields = {"delay": LATER} if n % 2 else {}
                    c.send(op="add", target="examples.jobs:echo", args=[round_, n], **fields)
                replies = [c.recv() for _ in range(12)]
                batch = c.call(op="add_batch", jobs=[
                    {"target": "examples.jobs:echo", "args": [round_, "b", n], "delay": LATER}
                    for n in range(5)])
            d.kill()
            self.assertTrue(all(r["ok"] for r in replies), replies)
            self.assertTrue(batch["ok"], batch)
            new = [r["id"] for r in replies] + batch["ids"]
            new_args = [[round_, n] for n in range(12)] + [[round_, "b", n] for n in range(5)]
            self.assertEqual(len(set(new)), 17)
            self.assertFalse(before & set(new), "ids reused after a crash")
            if before:
                self.assertGreater(min(new), max(before))
            acked.update(zip(new, new_args))
            d.start()
            for job_id, args in acked.items():
                reply = d.call(op="get", id=job_id)
                self.assertTrue(reply["ok"], "acknowledged job %d lost in round %d: %s"
                                % (job_id, round_, reply))
                self.assertEqual(reply["job"]["args"], args)


####################################################################################################
#  One daemon per state_dir and per socket
####################################################################################################

class ExclusionTest(LifecycleCase):

    def test_second_daemon_on_same_state_dir_exits(self):
        job_id = self.daemon.add("examples.jobs:echo", delay=LATER)
        other = self.other_daemon(self.root, socket=os.path.join(self.root, "other.sock"))
        rc, err = self.start_must_fail(other)
        self.assertNotEqual(rc, 0)
        self.assertIn("lock", err.lower())
        self.assertEqual(self.daemon.get(job_id)["state"], "pending")   # the first one serves on
        self.assertEqual(self.daemon.add("examples.jobs:echo", delay=LATER), job_id + 1)

    def test_live_socket_makes_second_daemon_exit(self):
        other_root = os.path.join(self.root, "second")
        os.makedirs(other_root)
        inode = os.stat(self.daemon.socket).st_ino
        other = self.other_daemon(other_root, socket=self.daemon.socket)
        rc, err = self.start_must_fail(other)
        self.assertNotEqual(rc, 0, err)
        self.assertTrue(err.strip(), "the second daemon says why it exits")
        self.assertEqual(os.stat(self.daemon.socket).st_ino, inode, "the live socket was replaced")
        self.assertEqual(self.daemon.call(op="hello")["protocol"], 1)

    def test_stale_socket_is_replaced(self):
        d = self.daemon
        self.assertEqual(d.stop(), 0)
        if os.path.lexists(d.socket):
            os.unlink(d.socket)
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(d.socket)
        stale.close()                           # bound, never listened, file left behind
        self.assertTrue(os.path.exists(d.socket))
        d.start()
        job_id = d.add("examples.jobs:ExampleJob", args=["after stale"])
        self.assertEqual(d.wait_job(job_id)["state"], "succeeded")


####################################################################################################
#  Damaged state
####################################################################################################

class DamagedStateTest(LifecycleCase):

    def crashed_with_journal(self, n=3):
        """n pending jobs acknowledged, then SIGKILL: the journal holds them, one line each."""
        ids = [self.daemon.add("examples.jobs:echo", args=[i], delay=LATER) for i in range(n)]
        self.daemon.kill()
        path = os.path.join(self.daemon.state_dir, "journal.jsonl")
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
        self.assertGreaterEqual(len(lines), n)
        self.assertTrue(all(line.endswith(b"\n") for line in lines))
        return ids, path, lines

    def write(self, path, data):
        with open(path, "wb") as f:
            f.write(data)

    def assert_refuses(self, damaged_name):
        before = self.state_bytes()
        rc, err = self.start_must_fail(self.daemon)
        self.assertNotEqual(rc, 0)
        self.assertIn(damaged_name, err)
        self.assertEqual(self.state_bytes(), before, "the damaged state was changed")
        return err

    def test_garbage_snapshot_refuses_start(self):
        self.daemon.add("examples.jobs:echo", delay=LATER)
        self.assertEqual(self.daemon.stop(), 0)
        self.write(os.path.join(self.daemon.state_dir, "queue.json"),
                   b'{"format": 1, "jobs": [garbage\x00 \xff not json')
        self.assert_refuses("queue.json")

    def test_empty_snapshot_refuses_start(self):
        self.daemon.add("examples.jobs:echo", delay=LATER)
        self.assertEqual(self.daemon.stop(), 0)
        self.write(os.path.join(self.daemon.state_dir, "queue.json"), b"")
        self.assert_refuses("queue.json")

    def test_bad_journal_line_in_the_middle_refuses_start(self):
        ids, path, lines = self.crashed_with_journal()
        bad = len(lines) - 2                     # a job line with another after it
        offset = sum(len(line) for line in lines[:bad])
        lines[bad] = b'{"job": {"id": 2, "sta\x01 garbage\n'
        self.write(path, b"".join(lines))
        err = self.assert_refuses("journal.jsonl")
        self.assertIn(str(offset), err, "the message names the offset of the bad line")

    def test_torn_last_journal_line_is_dropped(self):
        ids, path, lines = self.crashed_with_journal()
        last = lines[-1]
        self.write(path, b"".join(lines[:-1]) + last[:len(last) // 2])
        before = len(self.daemon.read_stderr())
        self.daemon.start()
        warning = self.daemon.read_stderr()[before:]
        self.assertIn("journal.jsonl", warning, "a warning names the journal")
        for job_id in ids[:-1]:
            self.assertEqual(self.daemon.get(job_id)["state"], "pending")
        self.assert_not_found(ids[-1])
        job_id = self.daemon.add("examples.jobs:ExampleJob")
        self.assertEqual(self.daemon.wait_job(job_id)["state"], "succeeded")

        # and the journal it goes on with is whole again
        self.restart(signal.SIGKILL)
        self.assertEqual(self.daemon.get(job_id)["state"], "succeeded")

    def test_unparsable_complete_last_journal_line_is_dropped(self):
        ids, path, lines = self.crashed_with_journal()
        self.write(path, b"".join(lines[:-1]) + b'{"job": {"id": 3, "tar\n')
        before = len(self.daemon.read_stderr())
        self.daemon.start()
        self.assertIn("journal.jsonl", self.daemon.read_stderr()[before:])
        self.assertEqual([self.daemon.get(i)["state"] for i in ids[:-1]], ["pending"] * 2)


####################################################################################################
#  --check-config
####################################################################################################

class CheckConfigTest(unittest.TestCase):

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="jr-test-")
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name

    def config_file(self, **values):
        base = {"socket": os.path.join(self.root, "d.sock"),
                "state_dir": os.path.join(self.root, "state"),
                "log_dir": os.path.join(self.root, "logs")}
        base.update(values)
        path = os.path.join(self.root, "jobrunnerd.toml")
        with open(path, "w") as f:
            for key, value in base.items():
                f.write("%s = %s\n" % (key, toml_value(value)))
        return path

    def run_daemon(self, path, *args):
        return subprocess.run([sys.executable, DAEMON, "--config", path, *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=30)

    def test_good_config_passes(self):
        path = self.config_file(workers=3, backoff="fixed", retries=2, limits={"nofile": 256})
        proc = self.run_daemon(path, "--check-config")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.root, "d.sock")),
                         "--check-config must not start a daemon")

    def test_unknown_key_is_refused_and_named(self):
        path = self.config_file(workerz=2)
        for args in (("--check-config",), ()):
            proc = self.run_daemon(path, *args)
            self.assertNotEqual(proc.returncode, 0, args)
            self.assertIn("workerz", proc.stderr + proc.stdout, args)

    def test_bad_values_are_refused(self):
        for key, value in (("workers", 0), ("backoff", "linear"), ("fsync", "sometimes"),
                           ("retries", -1), ("shutdown_grace", "soon")):
            with self.subTest(key=key, value=value):
                proc = self.run_daemon(self.config_file(**{key: value}), "--check-config")
                self.assertNotEqual(proc.returncode, 0)
                self.assertIn(key, proc.stderr + proc.stdout)


####################################################################################################
#  Prune
####################################################################################################

class PruneTest(LifecycleCase):

    def output_files_with(self, marker):
        found = []
        out_dir = os.path.join(self.daemon.log_dir, "output")
        for name in os.listdir(out_dir):
            with open(os.path.join(out_dir, name), "rb") as f:
                if marker.encode() in f.read():
                    found.append(name)
        return found

    def test_prune_removes_finished_jobs_and_output(self):
        d = self.daemon
        ok = d.add("examples.jobs:ExampleJob", args=["marker-ok"])
        bad = d.add("examples.jobs:ErrorJob", args=["marker-bad"])
        cancelled = d.add("examples.jobs:echo", args=["marker-cancelled"], delay=LATER)
        pending = d.add("examples.jobs:echo", args=["marker-pending"], delay=LATER)
        self.assertEqual(d.wait_job(ok)["state"], "succeeded")
        self.assertEqual(d.wait_job(bad)["state"], "failed")
        self.assertTrue(d.call(op="cancel", id=cancelled)["ok"])
        self.assertEqual(len(self.output_files_with("marker-ok")), 1)
        self.assertEqual(len(self.output_files_with("about to fail")), 1)

        self.assertEqual(d.call(op="prune", older_than=LATER), {"ok": True, "removed": 0})
        self.assertEqual(d.get(ok)["state"], "succeeded")
        self.assertEqual(d.call(op="prune"), {"ok": True, "removed": 3})
        for job_id in (ok, bad, cancelled):
            self.assert_not_found(job_id)
            self.assertEqual(d.call(op="output", id=job_id)["error"]["code"], "not_found")
        self.assertEqual(self.output_files_with("marker-ok"), [])
        self.assertEqual(self.output_files_with("about to fail"), [])
        self.assertEqual(d.get(pending)["state"], "pending")
        self.assertEqual(d.call(op="stats")["counts"],
                         {"blocked": 0, "pending": 1, "running": 0, "succeeded": 0,
                          "failed": 0, "cancelled": 0})

        self.restart(signal.SIGKILL)            # pruned stays pruned
        for job_id in (ok, bad, cancelled):
            self.assert_not_found(job_id)
        self.assertEqual(d.get(pending)["state"], "pending")

    def test_prune_older_than(self):
        d = self.daemon
        old = d.add("examples.jobs:ExampleJob", args=["old"])
        t_old = d.wait_job(old)["finished_at"]
        wait_until(lambda: time.time() > t_old + 1.5, 10, message="1.5 s to pass")
        new = d.add("examples.jobs:ExampleJob", args=["new"])
        t_new = d.wait_job(new)["finished_at"]
        self.assertGreater(t_new - t_old, 1.5)
        # cutoff just after the old finish: the request may take up to 1.4 s on its way
        older_than = time.time() - (t_old + 0.1)
        self.assertEqual(d.call(op="prune", older_than=older_than)["removed"], 1)
        self.assert_not_found(old)
        self.assertEqual(d.get(new)["state"], "succeeded")


if __name__ == "__main__":
    unittest.main()
