"""Connections that cannot wedge or flood the daemon (SPEC §3, §5 idle_timeout, max_reply_buffer).

    HalfCloseTest         pipelined requests, then SHUT_WR (what `nc -N` and `printf | socat`
                          do): every whole request is answered before the daemon closes; a last
                          line without its newline gets bad_request; a pending wait still gets
                          its reply after the half-close.
    HangUpDuringWaitTest  clients that close while their `wait` is pending free their slot at
                          once (max_connections = 8, 3 rounds of 8 interrupted waits; killed
                          `jobctl wait`s; clients that half-closed, then closed).
    IdleTest              idle_timeout = 1: max_connections silent clients are hung up, and a
                          new client is served within a deadline.
    ReplyBufferTest       max_reply_buffer = 8 MiB: 50 clients pipeline big `list` requests and
                          never read. The daemon's RSS growth stays bounded and a `stats` from a
                          good client is answered fast.
    NoFreeFdTest          RLIMIT_NOFILE 64 (soft and hard) and clients holding every fd: the
                          daemon neither spins (CPU over 2 s) nor floods stderr; once some
                          clients close, the one left waiting in the backlog is served.

No fixed sleeps: polls have deadlines; the CPU and RSS figures are taken over a measuring window
that is a deadline loop too. JOBRUNNER_CONNS_REPORT=1 prints the figures to stderr.
"""
import json
import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time
import unittest

from tests.support import DAEMON, JOBCTL, DaemonTestCase, Raw, daemon_env, wait_until

REPORT = os.environ.get("JOBRUNNER_CONNS_REPORT") == "1"


def report(line):
    if REPORT:
        print("[conns] " + line, file=sys.stderr)


def read_lines_to_eof(sock, timeout=30.0):
    """Every reply line until the daemon closes."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def connections(path):
    """Connections to the socket at `path`, from /proc/net/unix: the daemon's ends carry its
    path (also those still in the listen backlog), connected (St 03)."""
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in f]
    return sum(1 for row in rows[1:] if len(row) == 8 and row[7] == path and row[5] == "03")


def rss_bytes(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for %d" % pid)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HalfCloseTest(DaemonTestCase):

    def pipeline_then_half_close(self, lines):
        """Send `lines` from a thread (the daemon answers while we send), SHUT_WR, read all."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.daemon.socket)
        errors = []

        def send():
            try:
                sock.sendall(b"".join(lines))
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            replies = read_lines_to_eof(sock, timeout=60)
        finally:
            sender.join(60)
            sock.close()
        self.assertEqual(errors, [])
        return replies

    def test_3000_requests_then_half_close_get_3000_replies(self):
        replies = self.pipeline_then_half_close([b'{"op": "hello"}\n'] * 3000)
        self.assertEqual(len(replies), 3000)
        self.assertTrue(all(r["ok"] and r["protocol"] == 1 for r in replies))

    def test_5000_pipelined_adds_then_half_close_are_all_acknowledged(self):
        self.assertTrue(self.daemon.call(op="pause")["ok"])     # nothing runs meanwhile
        line = json.dumps({"op": "add", "target": "examples.jobs:ExampleJob"}).encode() + b"\n"
        replies = self.pipeline_then_half_close([line] * 5000)
        self.assertEqual(len(replies), 5000)
        self.assertTrue(all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3])
        self.assertEqual(len({r["id"] for r in replies}), 5000)
        stats = self.daemon.call(op="stats")
        self.assertEqual(stats["counts"]["pending"], 5000, "every job made was acknowledged")

    def test_last_line_without_newline_gets_bad_request(self):
        replies = self.pipeline_then_half_close([b'{"op": "hello"}\n', b'{"op": "stats"}\n',
                                                 b'{"op": "hel'])
        self.assertEqual([r["ok"] for r in replies], [True, True, False])
        self.assertEqual(replies[2]["error"]["code"], "bad_request")
        self.assertIn("newline", replies[2]["error"]["message"])

    def test_half_close_after_wait_still_gets_the_wait_reply(self):
        job_id = self.daemon.add("examples.jobs:DelayedJob", args=[0.5])
        replies = self.pipeline_then_half_close([
            json.dumps({"op": "wait", "id": job_id}).encode() + b"\n",
            b'{"op": "hello"}\n', b'{"op": "hel'])
        self.assertEqual(len(replies), 3, replies)
        self.assertTrue(replies[0]["done"], replies[0])
        self.assertEqual(replies[0]["job"]["state"], "succeeded")
        self.assertEqual(replies[1]["protocol"], 1)
        self.assertEqual(replies[2]["error"]["code"], "bad_request")


class HangUpDuringWaitTest(DaemonTestCase):
    config = {"max_connections": 8}

    def test_clients_that_hang_up_during_a_wait_free_their_slots(self):
        job_id = self.daemon.add("examples.jobs:DelayedJob", args=[60])
        self.no_connections()
        for round_ in range(3):
            waiters = []
            for i in range(8):
                c = self.daemon.raw(timeout=10)
                # with and without a timeout: the timer must go too
                timeout = {"timeout": 300} if i % 2 else {}
                c.send(op="wait", id=job_id, **timeout)
                waiters.append(c)
            # every slot is taken (the waits are pending): a ninth client is refused
            wait_until(lambda: self.busy(), 10, message="the 9th client to get busy")
            for c in waiters:           # `timeout 0.3 jobctl wait ID`: the client goes away
                c.close()
            # all 8 slots are free at once, not when the job ends in a minute
            wait_until(lambda: self.served(8), 10, message="8 clients at once to be served "
                       "after the hang-ups (round %d)" % round_)
        with self.daemon.raw() as c:
            # the waits ended because their clients went, not because the job did
            self.assertIn(c.call(op="get", id=job_id)["job"]["state"], ("pending", "running"))

    def test_clients_that_half_close_then_close_during_a_wait_free_their_slots(self):
        job_id = self.daemon.add("examples.jobs:DelayedJob", args=[60])
        self.no_connections()
        waiters = []
        for i in range(8):
            c = self.daemon.raw(timeout=10)
            c.send(op="wait", id=job_id, timeout=0.3)
            c.send(op="wait", id=job_id)
            c.sock.shutdown(socket.SHUT_WR)     # the waits are still answered (HalfCloseTest)
            waiters.append(c)
        for c in waiters:
            # answered passes after the daemon saw the half-close; the second wait is pending
            self.assertFalse(c.recv()["done"])
        wait_until(lambda: self.busy(), 10, message="the 9th client to get busy")
        for c in waiters:
            c.close()
        wait_until(lambda: self.served(8), 10, message="8 clients at once to be served "
                   "after the half-closed waiters left")

    def test_input_behind_a_pending_wait_is_bounded(self):
        # a waiting connection is read (to see it hang up), but not without end
        job_id = self.daemon.add("examples.jobs:DelayedJob", args=[60])
        self.no_connections()
        pid = self.daemon.proc.pid
        with self.daemon.raw(timeout=10) as c:
            c.send(op="wait", id=job_id)
            base = rss_bytes(pid)
            c.sock.setblocking(False)
            sent, chunk = 0, b"x" * 65536           # one endless line
            while sent < 64 * 2**20:
                try:
                    sent += c.sock.send(chunk)
                except BlockingIOError:
                    # not writable for a second: the daemon stopped reading, as it should
                    if not select.select([], [c.sock], [], 1.0)[1]:
                        break
            growth = rss_bytes(pid) - base
            self.assertLess(sent, 16 * 2**20, "the daemon read on behind a pending wait")
            self.assertLess(growth, 16 * 2**20)
        # not read, and not forgotten either: its hang-up is seen
        wait_until(lambda: self.served(8), 10, message="8 clients at once to be served")

    def test_a_client_killed_during_jobctl_wait_frees_its_slot(self):
        job_id = self.daemon.add("examples.jobs:DelayedJob", args=[60])
        self.no_connections()
        procs = [subprocess.Popen([sys.executable, JOBCTL, "--socket", self.daemon.socket,
                                   "wait", str(job_id)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for _ in range(8)]
        try:
            # counted in /proc/net/unix: a probe connection would take a slot from them
            wait_until(lambda: connections(self.daemon.socket) == 8, 30,
                       message="8 jobctl waits to be connected")
        finally:
            for p in procs:
                p.kill()
                p.wait(10)
        wait_until(lambda: self.served(8), 10, message="8 clients at once to be served after "
                   "jobctl was killed")

    def no_connections(self):
        """Earlier connections are closed by the daemon: each test's clients get every slot."""
        wait_until(lambda: connections(self.daemon.socket) == 0, 10,
                   message="the earlier connections to be closed")

    def busy(self):
        try:
            with self.daemon.raw(timeout=10) as c:
                reply = c.call(op="hello")
        except (ConnectionError, OSError):
            return False
        return not reply["ok"] and reply["error"]["code"] == "busy"

    def served(self, n):
        """n clients connected at once are all served (none gets busy)."""
        clients = [self.daemon.raw(timeout=10) for _ in range(n)]
        try:
            return all(c.call(op="hello")["ok"] for c in clients)
        except (ConnectionError, OSError):
            return False
        finally:
            for c in clients:
                c.close()


class IdleTest(DaemonTestCase):
    config = {"idle_timeout": 1, "max_connections": 20}

    def test_silent_clients_are_hung_up_and_a_new_client_is_served(self):
        # the start-up check's connection is gone: the 20 take every slot, none is refused
        wait_until(lambda: connections(self.daemon.socket) == 0, 10,
                   message="no connection left from the start")
        start = time.monotonic()        # before they connect: their idle time counts from there
        silent = [self.daemon.raw(timeout=30) for _ in range(20)]
        try:
            with self.daemon.raw() as c:
                reply = c.call(op="hello")
            self.assertEqual(reply["error"]["code"], "busy", "every slot is taken")
            served = wait_until(self.served, 15, interval=0.1,
                                message="a new client to be served")
            self.assertTrue(served)
            # hung up: each silent client sees the end of its connection, and no reply
            for s in silent:
                self.assertEqual(read_lines_to_eof(s.sock, timeout=15), [])
            self.assertGreater(time.monotonic() - start, 0.5)
        finally:
            for s in silent:
                s.close()

    def served(self):
        with self.daemon.raw(timeout=10) as c:
            try:
                return c.call(op="hello")["ok"]
            except (ConnectionError, OSError):
                return False


class ReplyBufferTest(DaemonTestCase):
    CAP = 8 * 1024 * 1024
    CLIENTS = 50
    config = {"max_reply_buffer": CAP, "fsync": "never"}

    def test_clients_that_never_read_do_not_grow_the_daemon(self):
        self.assertTrue(self.daemon.call(op="pause")["ok"])
        job = {"target": "examples.jobs:ExampleJob", "args": ["x"]}
        with self.daemon.raw() as c:
            for _ in range(3):
                self.assertTrue(c.call(op="add_batch", jobs=[job] * 1000)["ok"])
            one = len(json.dumps(c.call(op="list", limit=1000)))
        pid = self.daemon.proc.pid
        base = rss_bytes(pid)
        request = b'{"op": "list", "limit": 1000}\n' * 300
        flooders = []
        for _ in range(self.CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.daemon.socket)
            s.sendall(request)          # 9 KB: fits the socket buffer; never read
            flooders.append(s)
        try:
            peak, rtts, late = base, [], []
            with Raw(self.daemon.socket) as good:
                start = time.monotonic()
                while time.monotonic() - start < 3.0:    # the measuring window
                    t = time.monotonic()
                    self.assertTrue(good.call(op="stats")["ok"])
                    rtts.append(time.monotonic() - t)
                    if t - start > 1.5:
                        late.append(rtts[-1])
                    peak = max(peak, rss_bytes(pid))
            growth = peak - base
            rtts.sort()
            late.sort()
            report("reply buffer: %d clients, list reply %d B, RSS growth %.1f MiB (cap %.1f "
                   "MiB); stats: median %.2f ms, max %.1f ms over %d; in the last 1.5 s max "
                   "%.2f ms" % (self.CLIENTS, one, growth / 2**20, self.CAP / 2**20,
                                rtts[len(rtts) // 2] * 1e3, rtts[-1] * 1e3, len(rtts),
                                late[-1] * 1e3))
            # The cap bounds unsent replies; on top of it come the replies built in the pass
            # that reaches it (they are not cut) and the allocator's slack: measured 4-5 MiB
            # with ~480 KB replies, so up to 16 replies' worth is allowed. Without the cap
            # these 50 clients would pin 50 x 300 replies: gigabytes.
            self.assertLess(growth, self.CAP + 16 * one, "RSS grew %.1f MiB" % (growth / 2**20))
            self.assertLess(rtts[len(rtts) // 2], 0.05, "stats median")
        finally:
            for s in flooders:
                s.close()
        # they left: their buffers are released (what the allocator gives back is a bonus)
        wait_until(lambda: self.daemon.call(op="stats")["ok"], 10, message="stats")
        report("reply buffer: RSS after they left: %.1f MiB over the start"
               % ((rss_bytes(pid) - base) / 2**20))


NOFILE = 64


class NoFreeFdTest(DaemonTestCase):

    def prepare(self):
        self.daemon.start = self.start_limited

    def start_limited(self, wait=True, env=None, args=()):
        """support.Daemon.start, with RLIMIT_NOFILE (64, 64) in the daemon: soft AND hard, so
        that raising the soft limit at start-up cannot lift it."""
        d = self.daemon
        d.write_config()
        d.stderr = open(d.stderr_path, "ab")
        d.proc = subprocess.Popen(
            [sys.executable, DAEMON, "--config", d.config_path, *args],
            stdin=subprocess.DEVNULL, stdout=d.stderr, stderr=d.stderr,
            env=daemon_env() if env is None else env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE)))
        if wait:
            d.wait_ready()
        return d

    def test_no_free_fd_neither_spins_nor_floods_stderr(self):
        pid = self.daemon.proc.pid
        held, hanging = [], None
        try:
            for _ in range(NOFILE + 10):
                c = Raw(self.daemon.socket, timeout=2)
                try:
                    self.assertTrue(c.call(op="hello")["ok"])
                except (TimeoutError, socket.timeout):
                    hanging = c         # connected (the backlog), never accepted
                    break
                held.append(c)
            self.assertIsNotNone(hanging, "the daemon accepted %d clients" % len(held))
            stderr_before = self.daemon.read_stderr().count("\n")
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            wait_until(lambda: time.monotonic() - t0 > 2.0, 10, interval=0.1,
                       message="the measuring window")
            cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            stderr = self.daemon.read_stderr()
            report("no free fd: %d clients held, daemon CPU %.1f%% of a core, %d stderr lines "
                   "(%d bytes)" % (len(held), cpu * 100, stderr.count("\n"), len(stderr)))
            self.assertLess(cpu, 0.10, "the daemon spins with no fd free")
            self.assertLess(stderr.count("\n") - stderr_before, 3, stderr[-2000:])
            self.assertLess(stderr.count("\n"), 10, stderr[-2000:])
            # a running daemon and its clients: the ones held are still served
            self.assertTrue(held[0].call(op="hello")["ok"])
            for c in held[:5]:
                c.close()
            del held[:5]
            # the hanging client is accepted now, and its hello answered (read from the socket:
            # its file object is unusable after the timeout)
            hanging.sock.settimeout(10)
            line = b""
            while not line.endswith(b"\n"):
                chunk = hanging.sock.recv(4096)
                self.assertTrue(chunk, "closed without a reply")
                line += chunk
            self.assertTrue(json.loads(line)["ok"])
            with Raw(self.daemon.socket, timeout=10) as c:
                self.assertTrue(c.call(op="hello")["ok"])
        finally:
            for c in held:
                c.close()
            if hanging is not None:
                hanging.close()


if __name__ == "__main__":
    unittest.main()
