"""jobctl and Client against daemons that misbehave, and jobs that try to drive the terminal
(SPEC §4, exit codes and text output).

1. No hang, no unbounded memory: fake servers on a temp Unix socket that accept and never
   answer, send one endless line, flood replies, or send garbage. The reply deadline is
   shortened through the Client's `timeout` or $JOBRUNNER_REPLY_TIMEOUT (the 30 s default is
   checked to stay the default); `wait --timeout D` is held to D + 5 s with the default, also
   against a real SIGSTOPped daemon.
2. No raw control character in text output: a real daemon with a job whose key, args, error,
   result and output are full of control characters, and every command run on it.

A test that would hang on a client without limits runs its client in a subprocess or a
thread with a deadline, and the fake servers stop sending after a cap, so that an old client
fails the test instead of hanging it or filling the machine's memory.
"""
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

from tests.support import JOBCTL, DaemonTestCase, wait_until

import jobctl  # noqa: E402  (tests.support puts the project root on sys.path)

DEADLINE = 15.0     # seconds before a client that should have given up is called hung
MIB = 1024 * 1024


def client_env(**extra):
    """This environment without JOBRUNNER_* (a socket or timeout of the test run), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    env.update(extra)
    return env


class FakeServer:
    """A Unix socket in a temp dir; each connection is handed to `behave(conn)` in a thread.
    close() shuts every connection down, which also ends a client still blocked on it."""

    def __init__(self, behave):
        self.behave = behave
        self._tmp = tempfile.TemporaryDirectory(prefix="jr-fake-")
        self.path = os.path.join(self._tmp.name, "fake.sock")
        self.conns = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            self.behave(conn)
        except OSError:
            pass  # the client gave up and closed: what the test wants

    def close(self):
        for s in [self.listener, *self.conns]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._tmp.cleanup()


def hold(conn):
    """Read until the client closes; answer nothing."""
    while conn.recv(65536):
        pass


def read_line(conn):
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


def endless_line(cap):
    """Send one line that never ends (up to `cap` bytes, then hold: a client that does not
    stop at its limit then waits, and its test fails on the deadline instead)."""
    def behave(conn):
        chunk = b"x" * MIB
        for _ in range(cap // MIB):
            conn.sendall(chunk)
        hold(conn)
    return behave


def answer(data):
    """Answer each request line with `data`."""
    def behave(conn):
        while read_line(conn):
            conn.sendall(data)
    return behave


def run_jobctl(socket_path, *args, env=None, timeout=DEADLINE):
    """jobctl.py as a subprocess: (exit code, stdout bytes, stderr bytes, seconds, peak RSS in
    bytes). A run past `timeout` is killed and fails the calling test."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, JOBCTL, "--socket", socket_path, *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=client_env() if env is None else env)
        while True:  # wait4 for the child's own peak RSS; polled for the deadline
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise AssertionError("jobctl %s still running after %.0f s" % (" ".join(args), timeout))
            time.sleep(0.01)  # the polling interval of this deadline loop, not a synchronisation
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), elapsed, usage.ru_maxrss * 1024


def in_thread(test, fn, seconds=DEADLINE):
    """fn() in a thread; its result, or the exception it raised. Fails the test if it is
    still running after `seconds` (the fake server's cleanup then releases it)."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        test.fail("still waiting after %.0f s" % seconds)
    return box.get("error", box.get("result"))


####################################################################################################
#  1. never hang, never flood memory
####################################################################################################

class ServerCase(unittest.TestCase):

    def serve(self, behave):
        server = FakeServer(behave)
        self.addCleanup(server.close)
        return server

    def main(self, socket_path, *argv):
        """jobctl.main() in this process: (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = jobctl.main(["--socket", socket_path, *argv])
        return code, out.getvalue(), err.getvalue()


class ReplyTimeoutTest(ServerCase):

    def test_the_default_reply_timeout_is_30_seconds_and_the_environment_changes_it(self):
        self.assertEqual(jobctl.REPLY_TIMEOUT, 30.0)
        with mock.patch.dict(os.environ, client_env(), clear=True):
            self.assertEqual(jobctl.Client("/nowhere").timeout, 30.0)
            os.environ["JOBRUNNER_REPLY_TIMEOUT"] = "0.5"
            self.assertEqual(jobctl.Client("/nowhere").timeout, 0.5)
            self.assertEqual(jobctl.Client("/nowhere", timeout=None).timeout, None)  # explicit: no limit
            os.environ["JOBRUNNER_REPLY_TIMEOUT"] = "soon"
            code, out, err = self.main("/nowhere", "stats")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("JOBRUNNER_REPLY_TIMEOUT", err)

    def test_client_raises_reply_timeout_when_the_daemon_accepts_and_never_answers(self):
        server = self.serve(hold)
        with jobctl.Client(server.path, timeout=0.3) as c:
            start = time.monotonic()
            error = in_thread(self, c.stats)
            elapsed = time.monotonic() - start
        self.assertIsInstance(error, jobctl.ReplyTimeout)
        self.assertIsInstance(error, jobctl.DaemonUnreachable)
        self.assertEqual(error.code, "timeout")
        self.assertLess(elapsed, 5.0)

    def test_a_reply_trickled_byte_by_byte_still_has_one_deadline(self):
        def trickle(conn):
            read_line(conn)
            for _ in range(100):                     # 10 s of one byte every 0.1 s
                conn.sendall(b" ")
                time.sleep(0.1)                      # the misbehaviour under test, not a sync
        server = self.serve(trickle)
        with jobctl.Client(server.path, timeout=0.5) as c:
            start = time.monotonic()
            error = in_thread(self, c.hello)
        self.assertIsInstance(error, jobctl.ReplyTimeout)
        self.assertLess(time.monotonic() - start, 5.0)

    def test_wait_without_timeout_asks_in_slices_and_notices_a_silent_daemon(self):
        server = self.serve(hold)
        with mock.patch.object(jobctl, "_WAIT_SLICE", 0.2), jobctl.Client(server.path, timeout=0.3) as c:
            error = in_thread(self, lambda: c.wait(1))
        self.assertIsInstance(error, jobctl.ReplyTimeout)

    def test_jobctl_stats_exits_3_when_no_reply_comes(self):
        server = self.serve(hold)
        code, out, err, elapsed, _ = run_jobctl(server.path, "stats",
                                                env=client_env(JOBRUNNER_REPLY_TIMEOUT="0.5"))
        self.assertEqual((code, out), (3, b""), err)
        self.assertIn(b"jobctl: error: timeout:", err)
        self.assertNotIn(b"Traceback", err)
        self.assertLess(elapsed, 10.0)

    def test_jobctl_wait_timeout_returns_within_d_plus_5_with_the_default_reply_timeout(self):
        server = self.serve(hold)
        code, out, err, elapsed, _ = run_jobctl(server.path, "wait", "1", "2", "3", "--timeout", "1")
        self.assertEqual(code, 4, err)
        self.assertIn(b"jobctl: error: timeout:", err)
        self.assertNotIn(b"Traceback", err)
        self.assertLess(elapsed, 1 + 5)


class ReplySizeTest(ServerCase):

    def test_an_endless_line_is_a_bad_reply_at_the_limit(self):
        server = self.serve(endless_line(4 * MIB))
        with mock.patch.object(jobctl, "MAX_REPLY_BYTES", MIB), jobctl.Client(server.path, timeout=5) as c:
            error = in_thread(self, c.stats)
            self.assertIsInstance(error, jobctl.BadReply)
            self.assertIsInstance(error, jobctl.DaemonUnreachable)
            self.assertEqual(error.code, "bad_reply")
            self.assertEqual(len(c._rbuf), 0)   # the connection is closed, its buffer dropped

    def test_jobctl_stats_against_an_endless_line_exits_3_in_bounded_memory(self):
        server = self.serve(endless_line(jobctl.MAX_REPLY_BYTES + 16 * MIB))
        code, out, err, elapsed, rss = run_jobctl(server.path, "stats")
        self.assertEqual((code, out), (3, b""), err)
        self.assertIn(b"bad_reply", err)
        self.assertNotIn(b"Traceback", err)
        # The line is refused at 64 MiB: a buffer of that, not of what the daemon sends.
        self.assertLess(rss, jobctl.MAX_REPLY_BYTES * 2.5, "peak RSS %.0f MiB" % (rss / MIB))

    def test_more_replies_than_requests_is_a_bad_reply(self):
        server = self.serve(answer(b'{"ok":true}\n' * 100_000))   # a 1.2 MB flood per request
        with jobctl.Client(server.path, timeout=5) as c:
            error = in_thread(self, c.hello)
        self.assertIsInstance(error, jobctl.BadReply)


class GarbageTest(ServerCase):
    """Whatever the daemon sends, every command exits 3 with a message, never a traceback."""

    GARBAGE = (b"not json\n", b"\xff\xfe\x00garbage\n", b"[" * 100_000 + b"\n", b"42\n",
               b'"ok"\n', b'{"ok": NaN}\n', b'{"ok": true, "counts": Infinity}\n',
               b'{"ok": true}\n',
               b'{"ok": true, "id": "1\\u001b[2J", "ids": [null], "job": "x", "jobs": [1], '
               b'"counts": [], "done": 1, "data": 5, "paused": "yes", "removed": null}\n',
               b'{"ok": true, "job": null, "done": false}\n')
    COMMANDS = (["stats"], ["show", "1"], ["list"], ["wait", "1", "--timeout", "1"], ["wait", "1"],
                ["cancel", "1"], ["retry", "1", "2"], ["logs", "1"], ["add", "examples.jobs:echo"],
                ["add", "examples.jobs:echo", "--wait"], ["prune"], ["pause"], ["resume"])

    def test_every_command_against_every_garbage(self):
        for garbage in self.GARBAGE:
            server = self.serve(answer(garbage))
            for argv in self.COMMANDS:
                with self.subTest(garbage=garbage[:60], argv=argv):
                    code, out, err = in_thread(self, lambda: self.main(server.path, *argv))
                    self.assertEqual(code, 3, (out, err))
                    self.assertIn("jobctl: error: bad_reply:", err)
                    self.assertNotIn("\x1b", out + err)

    def test_logs_against_output_that_never_advances_ends(self):
        server = self.serve(answer(b'{"ok": true, "data": "again", "offset": 0, "eof": false}\n'))
        code, out, err = in_thread(self, lambda: self.main(server.path, "logs", "1"))
        self.assertEqual(code, 3)
        self.assertIn("bad_reply", err)
        self.assertLess(len(out), 100)

    def test_no_traceback_from_the_real_program(self):
        server = self.serve(answer(b"[" * 100_000 + b"\n"))
        code, out, err, _, _ = run_jobctl(server.path, "show", "1")
        self.assertEqual((code, out), (3, b""), err)
        self.assertNotIn(b"Traceback", err)


class StoppedDaemonTest(DaemonTestCase):
    """The reproduction itself: a real daemon, SIGSTOPped (the kernel still queues connections
    in its listen backlog; nobody answers them)."""

    def test_jobctl_against_a_stopped_daemon(self):
        job_id = self.daemon.add(delay=3600)
        os.kill(self.daemon.proc.pid, signal.SIGSTOP)
        self.addCleanup(os.kill, self.daemon.proc.pid, signal.SIGCONT)
        code, _, err, elapsed, _ = run_jobctl(self.daemon.socket, "wait", str(job_id), "--timeout", "1")
        self.assertEqual(code, 4, err)
        self.assertLess(elapsed, 1 + 5)
        code, _, err, elapsed, _ = run_jobctl(self.daemon.socket, "stats",
                                              env=client_env(JOBRUNNER_REPLY_TIMEOUT="1"))
        self.assertEqual(code, 3, err)
        self.assertIn(b"jobctl: error: timeout:", err)
        self.assertNotIn(b"Traceback", err)


####################################################################################################
#  2. no job or client drives the terminal
####################################################################################################

EVIL = "k\x1b]0;pwned\x07\r\x1b[2Kstate: succeeded\x9b31m\x7f\u2028\u2029\x00\x08\ttab\nnl"
JOB_MODULE = "ctljobs"
JOB_SOURCE = '''
import sys

EVIL = %r


def fail(*args):
    raise RuntimeError("boom " + EVIL)


def succeed(*args):
    return {"evil": EVIL, "args": list(args)}


def emit(*args):
    sys.stdout.write("out " + EVIL + "\\n")
    sys.stdout.flush()
''' % EVIL


def raw_controls(text):
    """The control characters in `text`, other than newline and tab."""
    return sorted({c for c in text if c not in "\n\t" and (ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0
                                                           or c in "\u2028\u2029")})


class TerminalInjectionTest(DaemonTestCase):
    config = {"allow": ["examples.*:*", JOB_MODULE + ":*"]}

    def prepare(self):
        self.write_job_module(JOB_MODULE, JOB_SOURCE)

    def ctl(self, *args, codes=(0,), tty=False):
        """jobctl with stdout on a pipe (or a pseudo-terminal); checks that neither stream has
        a raw control character. Returns (stdout, stderr) as text."""
        if tty:
            code, out, err = self.ctl_on_tty(*args)
        else:
            proc = subprocess.run([sys.executable, JOBCTL, "--socket", self.daemon.socket, *args],
                                  capture_output=True, timeout=60, env=client_env())
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        out, err = out.decode("utf-8"), err.decode("utf-8")
        self.assertIn(code, codes, (args, out, err))
        self.assertEqual(raw_controls(out), [], ("stdout", args, out))
        self.assertEqual(raw_controls(err), [], ("stderr", args, err))
        return out, err

    def ctl_on_tty(self, *args):
        import pty
        import tty
        master, slave = pty.openpty()
        tty.setraw(slave)  # no \n -> \r\n translation: what jobctl writes is what we read
        try:
            proc = subprocess.Popen([sys.executable, JOBCTL, "--socket", self.daemon.socket, *args],
                                    stdout=slave, stderr=subprocess.PIPE, env=client_env())
        finally:
            os.close(slave)
        out = b""
        try:
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            err = proc.stderr.read()
            proc.wait(60)
        finally:
            os.close(master)
            proc.stderr.close()
        return proc.returncode, out, err

    def add(self, target, **fields):
        return self.daemon.call(op="add", target=JOB_MODULE + ":" + target, **fields)["id"]

    def test_every_command_escapes_user_strings(self):
        failed = self.add("fail", args=[EVIL], key=EVIL)
        done = self.add("succeed", args=[EVIL], kwargs={EVIL: EVIL})
        pending = self.add("succeed", args=[EVIL], key=EVIL + "2", delay=3600)
        self.daemon.wait_job(failed)
        self.daemon.wait_job(done)

        out, _ = self.ctl("show", str(failed))
        self.assertIn("key: k\\x1b]0;pwned\\x07\\r\\x1b[2Kstate: succeeded\\x9b31m\\x7f\\u2028\\u2029"
                      "\\x00\\x08\\ttab\\nnl", out)
        self.assertIn("error: RuntimeError: boom k\\x1b]0;pwned", out)
        self.assertEqual(len([line for line in out.splitlines() if line.startswith("state:")]), 1)
        out, _ = self.ctl("show", str(done))
        self.assertIn("\\x1b", out)
        self.ctl("list")
        out, _ = self.ctl("wait", str(failed), codes=(1,))
        self.assertIn("boom k\\x1b]0;pwned\\x07", out)
        argv_evil = EVIL.replace("\x00", "")  # argv cannot carry NUL
        self.ctl("add", JOB_MODULE + ":fail", argv_evil, "--key", argv_evil, "--wait", codes=(1,))
        self.ctl("retry", str(failed))
        self.ctl("cancel", str(failed), str(pending), str(done), codes=(2,))   # done: invalid_state
        self.ctl("stats")
        _, err = self.ctl("add", "bad\x1b]0;x\x07target", codes=(2,))           # the daemon quotes it
        self.assertIn("\\x1b", err)
        _, err = self.ctl("add", "t:x", "--bogus\x1b[2J", codes=(2,))           # argparse quotes it
        self.assertIn("--bogus\\x1b[2J", err)

    def test_json_output_is_json_and_escaped(self):
        job_id = self.add("succeed", args=[EVIL], key=EVIL, delay=3600)
        for args, record in ((["show", str(job_id)], lambda doc: doc),
                             (["list"], lambda doc: doc[0]),
                             (["wait", str(job_id), "--timeout", "0"], lambda doc: doc["job"])):
            out, _ = self.ctl("--json", *args, codes=(0, 4))
            job = record(json.loads(out))
            self.assertEqual((job["key"], job["args"]), (EVIL, [EVIL]))  # the same values, escaped

    def test_logs_escapes_on_a_terminal_and_raw_writes_as_is(self):
        job_id = self.add("emit")
        self.daemon.wait_job(job_id)
        wait_until(lambda: "pwned" in self.daemon.call(op="output", id=job_id)["data"])
        out, _ = self.ctl("logs", str(job_id), tty=True)
        self.assertIn("out k\\x1b]0;pwned\\x07\\r", out)
        self.assertIn("\\x08\ttab\nnl\n", out)  # tab and newline kept
        code, out, _ = self.ctl_on_tty("logs", str(job_id), "--raw")
        self.assertEqual(code, 0)
        self.assertIn(("out " + EVIL + "\n").encode("utf-8"), out)
        proc = subprocess.run([sys.executable, JOBCTL, "--socket", self.daemon.socket, "logs", str(job_id)],
                              capture_output=True, timeout=60, env=client_env())
        self.assertIn(("out " + EVIL + "\n").encode("utf-8"), proc.stdout)  # a pipe gets the bytes


class EscapeTest(unittest.TestCase):

    def test_escape(self):
        self.assertEqual(jobctl.escape("plain ü ✓"), "plain ü ✓")
        self.assertEqual(jobctl.escape("a\x1b[2J\r\n\t\x07\x7f\x85\u2028b"),
                         "a\\x1b[2J\\r\\n\\t\\x07\\x7f\\x85\\u2028b")
        self.assertEqual(jobctl.escape("a\n\tb\r", keep_lines=True), "a\n\tb\\r")
        for c in range(0x10000):
            ch = chr(c)
            if 0xd800 <= c < 0xe000:
                continue
            self.assertEqual(raw_controls(jobctl.escape(ch)), [], hex(c))


if __name__ == "__main__":
    unittest.main()
