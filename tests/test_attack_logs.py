"""Failing stderr and logs, planted symbolic links, directory modes, and a loop callback that
raises: none of them may stop the daemon, tear a log line, or make it write through a link.

SPEC §3: a failing stderr or log file (full disk, closed pipe) never stops the daemon; it says
so once where it still can, and once when writing works again; a log line is written whole or
not at all. SPEC §3a: files in state_dir and log_dir are never opened through a symbolic link,
and the daemon refuses to start when either directory is writable by another user.

A full disk without root: RLIMIT_FSIZE on the running daemon (resource.prlimit from the test),
past which a write fails with EFBIG, and a write across it is short.
"""
import errno
import json
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from unittest import mock

from tests import support
from tests.support import ROOT, children_named, in_process_daemon, wait_until

import jobrunnerd as jr

LINE_START = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z event=[a-z_]+( |$)")
TALK_MODULE = '''
import os
import sys
import time


def talk(n):
    sys.stdout.write("x" * n)
    sys.stdout.flush()
    return n


def talk_twice(n, printed, go):
    """Print, say so in the file `printed`, wait for the file `go`, print again."""
    sys.stdout.write("x" * n)
    sys.stdout.flush()
    open(printed, "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)
    sys.stdout.write("y" * n)
    sys.stdout.flush()
'''


def zygote_pids(daemon_pid):
    """The daemon's children whose command line names the zygote."""
    return children_named(daemon_pid, b"jobrunner-zygote")


def kill_zygote(daemon_pid):
    """SIGKILL the daemon's zygote: the daemon warns on stderr that it died."""
    [pid] = wait_until(lambda: zygote_pids(daemon_pid), 15, message="the zygote")
    os.kill(pid, signal.SIGKILL)
    # Reaped (no /proc entry left, not even a zombie's): the daemon has seen it die and warned.
    wait_until(lambda: not os.path.exists("/proc/%d" % pid), 15, message="the zygote reaped")
    return pid


def read_text(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


class Fixture(unittest.TestCase):
    """A fresh temp root per test and fixture daemons in it."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="jr-logs-")
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name
        os.makedirs(os.path.join(self.root, "jobs"))

    def daemon(self, root=None, **config):
        config.setdefault("allow", ["examples.*:*", "testjobs*:*"])
        d = support.Daemon(root or self.root, **config)
        self.addCleanup(self.stop, d)
        return d

    @staticmethod
    def stop(d):
        if d.proc is not None and d.proc.poll() is None:
            try:
                d.stop(signal.SIGTERM, timeout=30)
            except subprocess.TimeoutExpired:
                pass
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()

    def start_with_stderr(self, d, stderr_fd):
        """Start `d` with fd 2 (and 1) = `stderr_fd`; wait until it answers."""
        d.write_config()
        d.stderr = open(os.devnull, "wb")       # what d.stop() closes
        d.stderr_path = os.path.join(self.root, "no-stderr-file")
        d.proc = subprocess.Popen([sys.executable, support.DAEMON, "--config", d.config_path],
                                  stdin=subprocess.DEVNULL, stdout=stderr_fd, stderr=stderr_fd,
                                  env=support.daemon_env())
        d.wait_ready()
        return d

    def errors_log(self, d):
        return read_text(os.path.join(d.log_dir, "background_jobs_errors.log"))

    def refused(self, d, timeout=30):
        """Start `d`, which must refuse to start: (exit code, its stderr)."""
        d.start(wait=False)
        try:
            rc = d.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail("the daemon started although it must refuse: " + d.read_stderr())
        finally:
            d.stderr.close()
        return rc, d.read_stderr()


####################################################################################################
#  1. stderr that cannot be written
####################################################################################################

class FailingStderrTest(Fixture):
    """The warnings are provoked by killing the daemon's zygote (and by SIGHUP with a broken
    config), so these daemons use the zygote whatever JOBRUNNER_TEST_START_METHOD says."""

    def daemon(self, root=None, **config):
        return super().daemon(root, start_method="zygote", **config)

    def check_serves_and_runs(self, d):
        job = d.wait_job(d.add(), timeout=30)
        self.assertEqual(job["state"], "succeeded", job)
        self.assertIsNone(d.proc.poll(), "the daemon died")

    def write_failed_lines(self, d):
        return [line for line in self.errors_log(d).splitlines()
                if " event=write_failed " in line and "file=stderr" in line]

    def test_stderr_on_a_full_disk(self):
        d = self.daemon()
        with open("/dev/full", "wb") as full:                     # every write: ENOSPC
            self.start_with_stderr(d, full)
        kill_zygote(d.proc.pid)                                   # a warning on stderr
        self.check_serves_and_runs(d)
        kill_zygote(d.proc.pid)
        self.check_serves_and_runs(d)
        wait_until(lambda: self.write_failed_lines(d), 10, message="write_failed in errors log")
        [line] = self.write_failed_lines(d)                       # said once, not per line
        self.assertIn("No space left on device", line)

    def warn_into(self, d, w):
        """Start `d` with stderr on the pipe end `w` (closed here), provoke a warning, and wait
        until the errors log says that stderr failed; the daemon serves and runs jobs on."""
        try:
            self.start_with_stderr(d, w)
        finally:
            os.close(w)
        kill_zygote(d.proc.pid)
        self.check_serves_and_runs(d)
        wait_until(lambda: self.write_failed_lines(d), 10, message="write_failed in errors log")

    def test_stderr_a_pipe_whose_reader_is_gone(self):
        d = self.daemon()
        r, w = os.pipe()
        os.close(r)                                               # every write: EPIPE
        self.warn_into(d, w)
        [line] = self.write_failed_lines(d)
        self.assertIn("Broken pipe", line)

    def test_stderr_a_full_pipe_nobody_reads_never_blocks_the_loop(self):
        d = self.daemon()
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        os.set_blocking(w, False)
        try:
            while True:
                os.write(w, b"x" * 4096)
        except BlockingIOError:
            pass                                                  # full: a write would wait
        os.set_blocking(w, True)                                  # as a shell would pass it
        self.warn_into(d, w)
        # Someone reads again: the next warning gets through, and the errors log says so.
        os.set_blocking(r, False)
        try:
            while os.read(r, 65536):
                pass
        except BlockingIOError:
            pass
        with open(d.config_path, "a") as f:
            f.write("workers = = 1\n")                         # each SIGHUP: a warning

        def resumed():
            os.kill(d.proc.pid, signal.SIGHUP)
            return re.findall(r" event=write_resumed file=stderr lost=(\d+)", self.errors_log(d))
        # Said once no write failed for a second (WriteTrouble.QUIET), at the next warning.
        resumed = wait_until(resumed, 20, interval=0.2, message="write_resumed in the errors log")
        self.assertEqual(len(resumed), 1)
        self.assertGreaterEqual(int(resumed[0]), 2, "the start-up line and a zygote warning")
        self.assertEqual(len(self.write_failed_lines(d)), 1)
        said = b""
        deadline = time.monotonic() + 10
        while b"keeping the old config" not in said and time.monotonic() < deadline:
            try:
                said += os.read(r, 65536)
            except BlockingIOError:
                time.sleep(0.01)
        self.assertIn(b"keeping the old config", said)
        self.check_serves_and_runs(d)


####################################################################################################
#  2. a full log disk: whole lines or none, said once per file kind
####################################################################################################

class FullLogDiskTest(Fixture):

    FILLER = 256 * 1024         # the logs start this big: the limit is set just past them

    def test_log_and_output_writes_fail_then_resume_without_torn_lines_or_a_flood(self):
        logs = os.path.join(self.root, "logs")
        jr.make_dirs(logs, 0o750)
        line = "2026-12-01T00:00:00.000Z event=startup pid=1 filler=%s\n" % ("f" * 100)
        with open(os.path.join(logs, "background_jobs.log"), "w") as f:
            f.write(line * (self.FILLER // len(line) + 1))
        with open(os.path.join(self.root, "jobs", "testjobs_logs.py"), "w") as f:
            f.write(TALK_MODULE)
        d = self.daemon(workers=4)
        d.start()
        events = os.path.join(logs, "background_jobs.log")
        journal = os.path.join(d.state_dir, "journal.jsonl")
        before = os.path.getsize(events)
        limit = before + 60                         # the next write of lines is short
        self.assertLess(os.path.getsize(journal) + 64 * 1024, limit, "the journal stays below")
        # The output files of the next 41 jobs are already as large (sparse): each write to
        # them fails as the log's do, and none works until the limit is raised.
        for job_id in range(1, 42):
            with open(os.path.join(logs, "output", "%d.log" % job_id), "wb") as f:
                f.truncate(before)
        soft, hard = resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))
        go, printed = os.path.join(self.root, "go"), os.path.join(self.root, "printed")
        long = d.add("testjobs_logs:talk_twice", args=[1000, printed, go])
        reply = d.call(op="add_batch", jobs=[{"target": "testjobs_logs:talk", "args": [1000]}
                                             for i in range(40)])
        self.assertTrue(reply["ok"], reply)
        for job_id in reply["ids"]:
            self.assertEqual(d.wait_job(job_id, timeout=60)["state"], "succeeded")
        self.assertEqual(os.path.getsize(events), before, "a short write is cut back")
        wait_until(lambda: os.path.exists(printed), 30, message="the long job's first output")
        # The disk takes writes again; the long job prints once more.
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
        with open(go, "w"):
            pass
        self.assertEqual(d.wait_job(long, timeout=30)["state"], "succeeded")
        with open(os.path.join(logs, "output", "%d.log" % long), "rb") as f:
            # (line ends before the daemon's header, once the disk took it, and end lines)
            self.assertEqual(support.job_output(f.read()[before:]), b"\n\n[jobrunner: 1000 "
                             b"bytes of output lost: the disk refused them]\n" + b"y" * 1000
                             + b"\n")
        ran = []

        def resumed():
            # "Written again" is said at a write once none failed for a second (QUIET).
            ran.append(d.add("testjobs_logs:talk", args=[1000]))
            self.assertEqual(d.wait_job(ran[-1], timeout=30)["state"], "succeeded")
            err = d.read_stderr()
            return "background_jobs.log is written again" in err \
                and "job output is written again" in err
        wait_until(resumed, 30, interval=0.05, message="writes resumed, said on stderr")
        last = ran[-1]
        wait_until(lambda: d.job_events(last, "succeeded"), 10, message="the last job's line")
        with open(events, encoding="utf-8") as f:
            lines = f.readlines()
        for i, text in enumerate(lines):
            self.assertRegex(text, LINE_START, "line %d does not start a line" % (i + 1))
            self.assertEqual(text.count(" event="), 1, "line %d runs into another: %r"
                             % (i + 1, text[:300]))
            self.assertTrue(text.endswith("\n"), "line %d is torn" % (i + 1))
        with open(os.path.join(logs, "output", "%d.log" % last), "rb") as f:
            self.assertEqual(len(support.job_output(f.read())), 1000 + 1,     # + the line end
                             "the last job's output is whole")             # before the end line
        err = d.read_stderr()
        said = err.splitlines()
        self.assertEqual(sum("cannot write background_jobs.log" in s for s in said), 1, err)
        self.assertEqual(sum("cannot write job output" in s for s in said), 1, err)
        resumed = re.findall(r"background_jobs.log is written again; (\d+) lines", err)
        self.assertEqual(len(resumed), 1, err)
        self.assertGreaterEqual(int(resumed[0]), 3 * 40, "queued, started, succeeded: lost")
        lost = re.findall(r"job output is written again; (\d+) bytes", err)
        self.assertEqual(len(lost), 1, err)
        self.assertGreaterEqual(int(lost[0]), 41 * 1000, err)
        self.assertLessEqual(len(said), 6, "stderr is flooded:\n" + err[:3000])
        self.assertIsNone(d.proc.poll())


####################################################################################################
#  3. symbolic links planted in state_dir and log_dir
####################################################################################################

class SymlinkTest(Fixture):
    SECRET = b"not the daemon's: must stay as it is\n"

    def outside(self, root):
        path = os.path.join(root, "outside")
        with open(path, "wb") as f:
            f.write(self.SECRET)
        return path

    def assertUnchanged(self, path):
        with open(path, "rb") as f:
            self.assertEqual(f.read(), self.SECRET, "the link was followed")

    def test_a_link_in_place_of_a_file_it_opens_at_start_up_stops_it(self):
        cases = [("state", "lock"), ("state", "queue.json"), ("state", "journal.jsonl"),
                 ("logs", "background_jobs.log"), ("logs", "background_jobs_errors.log")]
        for where, name in cases:
            with self.subTest(name=name):
                root = tempfile.mkdtemp(dir=self.root)
                target = self.outside(root)
                jr.make_dirs(os.path.join(root, where), 0o750)
                link = os.path.join(root, where, name)
                os.symlink(target, link)
                d = self.daemon(root)
                rc, err = self.refused(d)
                self.assertNotEqual(rc, 0)
                self.assertIn(link, err)
                self.assertIn("symbolic link", err)
                self.assertUnchanged(target)

    def test_a_link_in_place_of_the_output_directory_stops_it(self):
        elsewhere = os.path.join(self.root, "elsewhere")
        os.makedirs(elsewhere)
        jr.make_dirs(os.path.join(self.root, "logs"), 0o750)
        link = os.path.join(self.root, "logs", "output")
        os.symlink(elsewhere, link)
        rc, err = self.refused(self.daemon())
        self.assertNotEqual(rc, 0)
        self.assertIn(link, err)
        self.assertIn("symbolic link", err)
        self.assertEqual(os.listdir(elsewhere), [])

    def test_a_link_planted_before_sighup_is_not_followed_and_the_old_log_goes_on(self):
        d = self.daemon()
        d.start()
        events = os.path.join(d.log_dir, "background_jobs.log")
        os.rename(events, events + ".1")                    # as logrotate does
        target = self.outside(self.root)
        os.symlink(target, events)
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_until(lambda: "cannot reopen the logs" in d.read_stderr(), 15,
                   message="the reload's warning")
        job_id = d.add()
        self.assertEqual(d.wait_job(job_id)["state"], "succeeded")
        self.assertUnchanged(target)
        with open(events + ".1") as f:
            self.assertIn(" event=succeeded job=%d " % job_id, f.read(), "written on to the old")
        self.assertIn("symbolic link", d.read_stderr())

    def test_links_in_place_of_temp_files_are_replaced_not_followed(self):
        state = os.path.join(self.root, "state")
        jr.make_dirs(state, 0o750)
        targets = {}
        for name in ("queue.json.tmp", "journal.jsonl.tmp"):
            targets[name] = self.outside(tempfile.mkdtemp(dir=self.root))
            os.symlink(targets[name], os.path.join(state, name))
        d = self.daemon()
        d.start()                               # a new journal: journal.jsonl.tmp, renamed
        job_id = d.add()
        self.assertEqual(d.wait_job(job_id)["state"], "succeeded")
        self.assertEqual(d.stop(), 0, d.read_stderr())        # the final snapshot: queue.json.tmp
        for target in targets.values():
            self.assertUnchanged(target)
        for name in ("queue.json", "journal.jsonl"):
            self.assertFalse(os.path.islink(os.path.join(state, name)), name)
        d.start()                               # what was written is the daemon's own state
        self.assertEqual(d.get(job_id)["state"], "succeeded")

    def test_a_link_in_place_of_a_job_output_file_is_not_followed(self):
        output = os.path.join(self.root, "logs", "output")
        jr.make_dirs(output, 0o750)
        target = self.outside(self.root)
        os.symlink(target, os.path.join(output, "1.log"))          # the next job's file
        d = self.daemon()
        d.start()
        first = d.add(args=["a"])
        self.assertEqual(first, 1)
        self.assertEqual(d.wait_job(first)["state"], "succeeded")
        self.assertEqual(d.wait_job(d.add(args=["b"]))["state"], "succeeded")
        self.assertUnchanged(target)
        reply = d.call(op="output", id=first)
        self.assertTrue(reply["ok"], reply)
        self.assertNotIn("must stay", reply["data"], "output read through the link")
        err = d.read_stderr()
        self.assertEqual(err.count("cannot write job output"), 1, err)
        self.assertIn("symbolic link, not followed: '%s'" % os.path.join(output, "1.log"), err)


####################################################################################################
#  4. directory modes
####################################################################################################

class DirectoryModeTest(Fixture):

    def check_refused(self, which, mode=None, uid=None):
        root = tempfile.mkdtemp(dir=self.root)
        path = {"state": os.path.join(root, "state"), "logs": os.path.join(root, "logs"),
                "output": os.path.join(root, "logs", "output")}[which]
        jr.make_dirs(path, 0o750)
        if mode is not None:
            os.chmod(path, mode)
        if uid is not None:
            os.chown(path, uid, -1)
        rc, err = self.refused(self.daemon(root))
        self.assertNotEqual(rc, 0)
        self.assertIn(path, err)
        self.assertIn("%04o" % (mode if mode is not None else 0o750), err)
        self.assertIn("refusing to start", err)

    def test_a_directory_others_may_write_to_is_refused(self):
        for which, mode in (("state", 0o777), ("state", 0o1777), ("logs", 0o770),
                            ("output", 0o757)):
            with self.subTest(which=which, mode=oct(mode)):
                self.check_refused(which, mode)

    @unittest.skipUnless(os.geteuid() == 0, "chown needs root")
    def test_a_directory_owned_by_another_user_is_refused(self):
        for which in ("state", "logs"):
            with self.subTest(which=which):
                self.check_refused(which, uid=65534)

    def test_own_directories_without_write_for_others_are_accepted(self):
        os.makedirs(os.path.join(self.root, "state"), 0o700)
        os.makedirs(os.path.join(self.root, "logs", "output"), 0o755)
        os.chmod(os.path.join(self.root, "logs"), 0o750)
        d = self.daemon()
        d.start()
        self.assertEqual(d.wait_job(d.add())["state"], "succeeded")


####################################################################################################
#  5. a loop callback that raises
####################################################################################################

class LoopGuardTest(unittest.TestCase):

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="jr-guard-")
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name
        self.cfg = jr.load_config(None, {
            "socket": os.path.join(self.root, "d.sock"),
            "state_dir": os.path.join(self.root, "state"),
            "log_dir": os.path.join(self.root, "logs"), "start_method": "spawn",
            "workers": 1, "job_paths": [ROOT]})
        self.d = in_process_daemon(self, self.cfg)
        # What the daemon says on fd 2 goes to a file for the length of the test.
        self.said = os.path.join(self.root, "said")
        saved = os.dup(2)
        with open(self.said, "wb") as f:
            os.dup2(f.fileno(), 2)

        def restore():
            os.dup2(saved, 2)
            os.close(saved)
        self.addCleanup(restore)

    def errors(self, where):
        self.d.log.flush()
        text = read_text(os.path.join(self.cfg.log_dir, "background_jobs_errors.log"))
        return [line for line in text.splitlines()
                if " event=internal_error " in line and where in line]

    def hello_through_the_loop(self):
        """A request served by loop passes (the daemon and this client share the thread)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(self.cfg.socket)
            c.sendall(b'{"op": "hello"}\n')
            c.setblocking(False)
            data = b""
            deadline = time.monotonic() + 10
            while not data.endswith(b"\n"):
                self.assertLess(time.monotonic(), deadline, "no reply")
                self.d.run_pass(0.01)
                try:
                    data += c.recv(4096)
                except BlockingIOError:
                    pass
            return json.loads(data)

    def test_a_timer_and_a_selector_callback_that_raise_are_logged_once_and_the_loop_goes_on(self):
        calls = []

        def failing_timer():
            calls.append("timer")
            self.d.loop.call_later(0, failing_timer)         # again and again, every pass
            raise RuntimeError("a bug in a timer")

        def failing_reader(mask):
            calls.append("reader")
            raise ValueError("a bug in a selector callback")  # never reads: ready every pass
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        os.write(w, b"x")
        self.d.loop.call_later(0, failing_timer)
        self.d.loop.watch(r, selectors.EVENT_READ, "internal", failing_reader)
        for _ in range(5):
            self.d.run_pass(0.01)
        self.assertGreaterEqual(calls.count("timer"), 5)
        self.assertGreaterEqual(calls.count("reader"), 5)
        self.assertEqual(self.hello_through_the_loop()["ok"], True)
        [timer] = self.errors("failing_timer")
        self.assertIn("a bug in a timer", timer)
        [reader] = self.errors("failing_reader")
        self.assertIn("a bug in a selector callback", reader)
        text = read_text(os.path.join(self.cfg.log_dir, "background_jobs_errors.log"))
        self.assertIn("    Traceback (most recent call last):", text)
        said = read_text(self.said)
        self.assertEqual(said.count("a bug in a timer"), 1, said)
        self.assertEqual(said.count("a bug in a selector callback"), 1, said)

    def test_a_bug_in_handling_one_signal_loses_no_other_signal_of_the_same_batch(self):
        def failing_reap():
            raise RuntimeError("a bug in reap")
        self.d.runner.reap = failing_reap
        self.d.wake_w.send(bytes([signal.SIGCHLD, signal.SIGTERM]))  # as the wakeup fd would
        for _ in range(3):
            self.d.run_pass(0.01)
        self.assertTrue(self.d.stopping, "the SIGTERM was lost")
        [line] = self.errors("failing_reap")
        self.assertIn("a bug in reap", line)

    def test_a_bug_in_a_handler_never_writes_stderr_another_way(self):
        class Unwritable:
            def write(self, text):
                raise OSError(errno.ENOSPC, "No space left on device")

            def flush(self):
                raise OSError(errno.ENOSPC, "No space left on device")

        def broken(daemon, req, conn):
            raise KeyError("a bug in a handler")
        with mock.patch.dict(jr.HANDLERS, {"hello": broken}), \
                mock.patch.object(sys, "stderr", Unwritable()):
            for _ in range(3):
                reply = json.loads(self.d.handle_line(None, b'{"op": "hello"}')[0])
                self.assertFalse(reply["ok"])
                self.assertIn("internal error", reply["error"]["message"])
        [line] = self.errors("hello")
        self.assertIn("a bug in a handler", line)
        self.assertEqual(read_text(self.said).count("a bug in a handler"), 1)


if __name__ == "__main__":
    unittest.main()
