"""Durability under crashes and full disks (SPEC §3 "an acknowledged add is on disk", §3a).

What tests/test_units.py and tests/test_e2e_lifecycle.py do not already cover:

    KillLoopTest              six clients enqueue concurrently (pipelined adds and add_batch)
                              while the daemon is SIGKILLed and restarted again and again, also
                              with jobs big enough that compaction runs between the kills (some
                              kills land right after queue.json was replaced, before the new
                              journal is): every acknowledged id is there afterwards, with its
                              own args, no id is acknowledged twice, and ids acknowledged after a
                              restart are above every id acknowledged before it.
    CompactionCrashTest       Store.snapshot() "dies" before each of its system calls in turn: a
                              fresh Store loads either the state before the snapshot or the one
                              after it (never a mix, never an error), and work goes on from there.
    DiskFullTest              a real ENOSPC on a small tmpfs holding state_dir (root only): no false
                              ack, reads go on, a SIGKILL while full loses nothing acknowledged, and
                              the daemon takes changes again once space is back.
    DiskErrorInProcessTest    EIO from fdatasync/fsync inside a real Daemon object (in this
                              process): io_error, the change undone in memory and not on disk,
                              reads go on, repair once the disk works again.
    StubbornOrphanTest        a job (and its grandchild) that ignores SIGTERM, running when the
                              daemon is SIGKILLed: after the restart both are gone before the next
                              attempt starts, `interrupted` is logged, the next attempt runs.

No fixed sleeps: the tests poll with deadlines (tests/support.wait_until, Event.wait as the poll
interval of client threads) and join threads with timeouts.
"""
import collections
import copy
import errno
import inspect
import io
import itertools
import json
import multiprocessing.sharedctypes
import os
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import unittest
from unittest import mock

from tests.support import ROOT, DaemonTestCase, Raw, in_process_daemon, wait_until

import jobrunnerd as jr  # noqa: E402  (tests.support put ROOT on sys.path)

TARGET = "examples.jobs:echo"


def queue_gen(state_dir):
    """The generation in queue.json's first line, or None when there is no snapshot yet."""
    try:
        with open(os.path.join(state_dir, "queue.json"), "rb") as f:
            head = f.readline(4096)
    except FileNotFoundError:
        return None
    found = re.search(rb'"gen":\s*(\d+)', head)
    return int(found.group(1)) if found else None


def list_all(daemon, **filters):
    """Every job, paging `list` with after_id; returns the list in the order the daemon gave."""
    out, after = [], 0
    with daemon.raw() as c:
        while True:
            reply = c.call(op="list", after_id=after, limit=1000, **filters)
            assert reply["ok"], reply
            if not reply["jobs"]:
                return out
            out.extend(reply["jobs"])
            after = reply["jobs"][-1]["id"]


def proc_state(pid):
    """(state letter, start time) from /proc/PID/stat, or None when there is no such process."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[19])


def running(pid, start):
    """True while the process `pid` that started at `start` runs (a zombie has ended)."""
    st = proc_state(pid)
    return st is not None and st[1] == start and st[0] not in ("Z", "X")


####################################################################################################
#  kill -9 under concurrent load
####################################################################################################

class LineClient(Raw):
    """One connection; a reply line without its newline means the daemon died mid-send."""

    def __init__(self, path, timeout=10.0):
        super().__init__(path, timeout)

    def send(self, requests):
        self.sock.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in requests))

    def recv(self):
        line = self.file.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError("connection lost")
        return json.loads(line)


class Enqueuer(threading.Thread):
    """A client that enqueues until `stop`: bursts of 1-6 pipelined adds or an add_batch of 20.
    While `go` is clear it parks between requests, keeping its connection open (so the test can
    kill a daemon that has answered everything and has nothing left to do).

    Every job's args are [client number, sequence number, pad], unique across the run. Each
    acknowledged id is kept as (id, client, seq, epoch). `epoch` is the number of the daemon
    process the connection talks to: the main thread bumps epoch[0] after a daemon is dead and
    before the next one starts, so a connection whose epoch reads the same before connect() and
    after its first reply can only be talking to daemon number `epoch`."""

    def __init__(self, number, socket_path, epoch, stop, go, pad):
        super().__init__(name="enqueuer-%d" % number, daemon=True)
        self.number, self.path, self.epoch, self.stop, self.go, self.pad = \
            number, socket_path, epoch, stop, go, pad
        self.parked = False
        self.rng = random.Random(number)
        self.acks = []
        self.per_epoch = collections.Counter()
        self.errors = []
        self.seq = 0

    def run(self):
        try:
            while not self.stop.is_set():
                conn, epoch = self.connect()
                if conn is None:
                    return
                try:
                    while not self.stop.is_set():
                        if not self.go.is_set():
                            self.park()
                            continue        # the daemon may have died meanwhile
                        self.enqueue_some(conn, epoch)
                except (OSError, ValueError):
                    pass            # the daemon died under us: what was not answered is unknown
                finally:
                    conn.close()
        except BaseException:
            self.errors.append(traceback.format_exc())

    def park(self):
        self.parked = True
        while not self.go.wait(0.01) and not self.stop.is_set():
            pass
        self.parked = False

    def connect(self):
        while not self.stop.is_set():
            epoch = self.epoch[0]
            try:
                conn = LineClient(self.path)
            except OSError:
                self.stop.wait(0.005)       # poll until the next daemon listens
                continue
            try:
                conn.send([{"op": "hello"}])
                hello = conn.recv()
            except (OSError, ValueError):
                conn.close()
                continue
            if hello.get("ok") and self.epoch[0] == epoch:
                return conn, epoch
            conn.close()
        return None, None

    def job(self, seq):
        return {"target": TARGET, "args": [self.number, seq, self.pad]}

    def enqueue_some(self, conn, epoch):
        first = self.seq
        if self.rng.random() < 0.6:
            n = self.rng.randint(1, 6)
            self.seq += n
            conn.send([dict(self.job(first + i), op="add") for i in range(n)])
            for i in range(n):
                reply = conn.recv()
                if reply.get("ok"):
                    self.acks.append((reply["id"], self.number, first + i, epoch))
                    self.per_epoch[epoch] += 1
                else:
                    self.errors.append("add refused: %r" % reply)
        else:
            self.seq += 20
            conn.send([{"op": "add_batch", "jobs": [self.job(first + i) for i in range(20)]}])
            reply = conn.recv()
            if reply.get("ok"):
                if len(reply["ids"]) != 20:
                    self.errors.append("add_batch of 20 answered with %r" % reply)
                for i, job_id in enumerate(reply["ids"]):
                    self.acks.append((job_id, self.number, first + i, epoch))
                self.per_epoch[epoch] += len(reply["ids"])
            else:
                self.errors.append("add_batch refused: %r" % reply)


class KillLoopTest(DaemonTestCase):
    CLIENTS = 6

    def start_clients(self, pad):
        self.epoch = [0]
        self.stop_clients = threading.Event()
        self.go = threading.Event()
        self.go.set()
        self.clients = [Enqueuer(i, self.daemon.socket, self.epoch, self.stop_clients, self.go,
                                 pad) for i in range(self.CLIENTS)]
        self.addCleanup(self.join_clients)
        for client in self.clients:
            client.start()

    def join_clients(self):
        self.stop_clients.set()
        deadline = time.monotonic() + 15
        for client in self.clients:
            client.join(max(0.0, deadline - time.monotonic()))
        stuck = [c.name for c in self.clients if c.is_alive()]
        self.assertEqual(stuck, [], "client threads did not stop")

    def acks(self):
        return [a for client in self.clients for a in client.acks]

    def acked_count(self):
        """Acks from the daemon running now (a dead one's last answers may still be read)."""
        return sum(client.per_epoch[self.epoch[0]] for client in self.clients)

    def client_errors(self):
        return [e for client in self.clients for e in client.errors]

    def wait_acks(self, n, timeout=20.0):
        """Wait until the running daemon has acknowledged `n` more jobs (to any client)."""
        target = self.acked_count() + n

        def enough():
            errors = self.client_errors()
            if errors:
                raise AssertionError("client error: %s" % errors[0])
            return self.acked_count() >= target
        wait_until(enough, timeout, interval=0.002, message="%d more acks" % n)

    def quiesce(self):
        """Let every client get all its answers and park: the daemon is idle, nothing unsent."""
        self.go.clear()
        wait_until(lambda: all(c.parked for c in self.clients), 20,
                   message="every client to park")

    def wait_compaction(self, timeout=20.0):
        """Wait until queue.json is replaced (a compaction just renamed it in): its generation
        grows (an inode number may come back: ext4 gives a freed one to the next file)."""
        gen = queue_gen(self.daemon.state_dir) or 0
        wait_until(lambda: (queue_gen(self.daemon.state_dir) or 0) > gen, timeout,
                   interval=0.001, message="a compaction")

    def crash_and_restart(self):
        rc = self.daemon.kill()
        self.assertEqual(rc, -signal.SIGKILL, self.daemon.read_stderr())
        self.epoch[0] += 1          # only after the old daemon is dead, before the new one
        self.daemon.start()
        self.go.set()

    def run_kill_loop(self, pad, rounds):
        """One SIGKILL per round, when: ("acks", N) N acks after the restart; ("idle", N) also
        every client has its answers and waits; ("now", 0) at once; ("compaction", 0) right
        after queue.json was replaced. Returns the snapshot generation after each restart."""
        d = self.daemon
        self.assertTrue(d.call(op="pause")["ok"])       # measure the queue, not job runs
        self.start_clients(pad)
        gens = [queue_gen(d.state_dir)]
        for when, n in rounds:
            if when in ("acks", "idle"):
                self.wait_acks(n)
            if when == "idle":
                self.quiesce()
            if when == "compaction":
                self.wait_compaction()
            self.crash_and_restart()
            gens.append(queue_gen(d.state_dir))
        self.wait_acks(50)
        self.quiesce()
        self.daemon.kill()              # every client has all its answers: the last crash
        self.join_clients()
        self.assertEqual(self.client_errors(), [])
        self.daemon.start()
        self.verify(1 + sum(when in ("acks", "idle") for when, _ in rounds))
        self.assertTrue(d.call(op="stats")["paused"], "pause must survive the crashes")
        return gens

    def verify(self, busy_epochs):
        acks = self.acks()
        ids = [a[0] for a in acks]
        twice = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
        self.assertEqual(twice, [], "ids acknowledged more than once")
        jobs = list_all(self.daemon)
        listed = [job["id"] for job in jobs]
        self.assertEqual(listed, sorted(set(listed)), "list must give each id once, ascending")
        by_id = {job["id"]: job for job in jobs}
        lost = [a for a in acks if a[0] not in by_id]
        self.assertEqual(lost, [], "acknowledged jobs lost (id, client, seq, epoch)")
        wrong = [(a, by_id[a[0]]["args"][:2]) for a in acks
                 if by_id[a[0]]["args"][:2] != [a[1], a[2]]]
        self.assertEqual(wrong, [], "an acknowledged id holds another job's args")
        for job_id in random.Random(7).sample(ids, min(40, len(ids))):
            reply = self.daemon.call(op="get", id=job_id)
            self.assertTrue(reply["ok"], reply)
            self.assertEqual(reply["job"], by_id[job_id])
        # Never reused: what a daemon acknowledges is above all that earlier daemons did.
        per_epoch = collections.defaultdict(list)
        for job_id, _, _, epoch in acks:
            per_epoch[epoch].append(job_id)
        highest = 0
        for epoch in sorted(per_epoch):
            self.assertGreater(min(per_epoch[epoch]), highest,
                               "daemon %d acknowledged an id not above those of earlier ones"
                               % epoch)
            highest = max(per_epoch[epoch])
        self.assertGreaterEqual(len(per_epoch), busy_epochs, "too few daemons took adds")
        return by_id

    def test_concurrent_clients_through_repeated_sigkill(self):
        self.run_kill_loop("", [("acks", 40), ("now", 0), ("acks", 700), ("acks", 5),
                                ("idle", 300), ("acks", 2500), ("acks", 150), ("acks", 1)])
        self.assertGreater(len(self.acks()), 3000)

    def test_sigkill_loop_while_compaction_runs(self):
        # ~2 KB of args per job: the 1 MiB journal threshold is crossed every few hundred adds,
        # then every time the journal outgrows the (growing) snapshot.
        gens = self.run_kill_loop("x" * 2048, [
            ("acks", 800), ("compaction", 0), ("acks", 300), ("compaction", 0), ("idle", 30),
            ("compaction", 0)])
        self.assertIsNotNone(gens[-1], "no compaction happened")
        self.assertGreaterEqual(gens[-1], 3, "too few compactions: generations %r" % gens)
        self.assertGreaterEqual(sum(1 for a, b in zip(gens, gens[1:]) if b != a), 3,
                                "compaction must happen between several kills: %r" % gens)
        self.assertEqual(gens, sorted(gens, key=lambda g: g or 0),
                         "the generation never goes back")


####################################################################################################
#  A crash at each step of compaction (Store.snapshot), unit level
####################################################################################################

class Crash(BaseException):
    """The process died here (not an OSError: no handler in the store may catch it)."""


def record(job_id, **fields):
    rec = {"id": job_id, "target": TARGET, "method": None, "args": ["a", job_id], "kwargs": {},
           "priority": 0, "state": "pending", "attempts": 0, "retries": 1, "retry_delay": 1.0,
           "backoff": "fixed", "timeout": 3600.0, "key": None, "created_at": 100.0,
           "run_at": 100.0}
    rec.update(fields)
    return jr.Job.from_stored(rec).stored()


class SyscallCrasher:
    """Patches the os calls the store makes; call number `crash_at` raises Crash instead of
    running (None: never). Keeps the names of the calls made and the fds still open."""

    NAMES = ("open", "write", "fsync", "fdatasync", "close", "replace", "rename", "unlink",
             "ftruncate")

    def __init__(self, crash_at=None):
        self.crash_at = crash_at
        self.calls = []
        self.open_fds = set()
        self.closed = set()
        self.real = {name: getattr(os, name) for name in self.NAMES}

    def wrap(self, name):
        real = self.real[name]

        def call(*args, **kwargs):
            label = name
            if name == "replace":
                label = "replace %s" % os.path.basename(args[1])
            if self.crash_at is not None and len(self.calls) + 1 == self.crash_at:
                self.calls.append("CRASH before " + label)
                raise Crash(label)
            self.calls.append(label)
            result = real(*args, **kwargs)
            if name == "open":
                self.open_fds.add(result)
            elif name == "close":
                self.open_fds.discard(args[0])
                self.closed.add(args[0])
            return result
        return call

    def __enter__(self):
        self.patches = [mock.patch.object(jr.os, name, self.wrap(name)) for name in self.NAMES]
        for p in self.patches:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in reversed(self.patches):
            p.stop()

    def close_leftovers(self, store, journal_fd):
        """What the kernel does for a dead process: close every fd it still had (those opened
        while patched, and the journal `store` had open before)."""
        if journal_fd is not None and journal_fd not in self.closed:
            self.open_fds.add(journal_fd)
        for fd in self.open_fds:
            os.close(fd)
        self.open_fds.clear()
        store.fd = None
        store.close()


class CompactionCrashTest(unittest.TestCase):
    """Snapshot generation 1 holds jobs 1-3; the journal then changes job 1 (running), adds job
    4, deletes job 3 and pauses: BEFORE. The snapshot written next holds AFTER: job 1 succeeded,
    job 5 added (appended but never committed: snapshot() folds such lines in), not paused.
    If the old journal were replayed on top of the new snapshot, job 1 would be running again."""

    BEFORE = ({"next_id": 5, "paused": True},
              {1: record(1, state="running", attempts=1, pid=4242), 2: record(2), 4: record(4)})
    AFTER = ({"next_id": 6, "paused": False},
             {1: record(1, state="succeeded", attempts=1, finished_at=200.0), 2: record(2),
              4: record(4), 5: record(5)})

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="jr-durability-")
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name

    def build(self, state, fsync):
        """A store at BEFORE with AFTER's extra change appended; returns it, opened."""
        os.makedirs(state)
        store = jr.Store(state, fsync=fsync)
        store.load()
        for i in (1, 2, 3):
            store.append({"job": record(i)})
        store.commit()
        store.snapshot({"next_id": 4, "paused": False},
                       [jr.Job.from_stored(record(i)) for i in (1, 2, 3)])
        for entry in ({"job": self.BEFORE[1][1]}, {"job": record(4)}, {"del": [3]},
                      {"paused": True}):
            store.append(entry)
            store.commit()
        store.append({"job": self.AFTER[1][1]})
        store.append({"job": record(5)})
        self.assertEqual(self.load(state), self.BEFORE)
        return store

    def load(self, state):
        store = jr.Store(state, fsync=False)
        try:
            meta, records = store.load()
        finally:
            store.close()
        self.assertEqual(store.warnings, [], "a crash in compaction must not tear the journal")
        return meta, records

    def compact(self, store, crasher):
        meta, records = self.AFTER
        with crasher:
            store.snapshot(dict(meta), [jr.Job.from_stored(r) for r in records.values()])

    def test_crash_before_each_system_call_of_snapshot(self):
        for fsync in (True, False):
            # A run without a crash names the steps: open/write/fsync/close of the temp
            # snapshot, replace queue.json, fsync of the directory, close of the old journal,
            # the same for the new journal, and opening it for appending.
            clean = SyscallCrasher()
            self.compact(self.build(os.path.join(self.tmp, "clean-%s" % fsync), fsync), clean)
            steps = clean.calls
            self.assertIn("replace queue.json", steps)
            self.assertIn("replace journal.jsonl", steps)
            seen_after = False
            for k in range(1, len(steps) + 2):
                where = "crash before call %d of %r" % (k, steps)
                with self.subTest(fsync=fsync, crash_at=k):
                    state = os.path.join(self.tmp, "k%d-%s" % (k, fsync))
                    store = self.build(state, fsync)
                    crasher = SyscallCrasher(k)
                    journal_fd = store.fd
                    try:
                        self.compact(store, crasher)
                        crashed = False
                    except Crash:
                        crashed = True
                    self.assertEqual(crashed, k <= len(steps), where)
                    crasher.close_leftovers(store, journal_fd)
                    got = self.load(state)
                    self.assertIn(got, (self.BEFORE, self.AFTER),
                                  "%s: neither the state before nor after" % where)
                    if got == self.AFTER:
                        seen_after = True
                    else:
                        self.assertFalse(seen_after, "%s: back to the old state after a later "
                                         "crash showed the new one" % where)
                    if k == 1:
                        self.assertEqual(got, self.BEFORE, where)
                    if not crashed:
                        self.assertEqual(got, self.AFTER, where)
                    self.assert_goes_on(state, got, fsync, where)

    def assert_goes_on(self, state, loaded, fsync, where):
        """Restart on the recovered state: commit, compact, commit; nothing lost or replayed."""
        meta, records = copy.deepcopy(loaded)
        store = jr.Store(state, fsync=fsync)
        try:
            self.assertEqual(store.load(), (meta, records), where)
            gen = store.gen
            newest = record(1, state="failed", attempts=2, finished_at=300.0)
            for entry in ({"job": record(10)}, {"job": newest}):
                store.append(entry)
            store.commit()
            records.update({10: record(10), 1: newest})
            meta["next_id"] = 11
            self.assertEqual(self.load(state), (meta, records), where + ", then a commit")
            store.snapshot(meta, [jr.Job.from_stored(r) for r in records.values()])
            self.assertGreater(store.gen, gen, where)
            store.append({"del": [2]})
            store.commit()
            del records[2]
            self.assertEqual(self.load(state), (meta, records),
                             where + ", then a commit, a snapshot and a commit")
        finally:
            store.close()


####################################################################################################
#  A real full disk (tmpfs), end to end
####################################################################################################

class DiskFullTest(DaemonTestCase):
    """state_dir on a 2 MiB tmpfs that the test fills up; log_dir stays on the normal disk."""

    BIG = "b" * 16384       # needs new pages: cannot fit in the slack of the journal's last page

    def prepare(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to mount a tmpfs")
        self.fs = os.path.join(self.root, "fs")
        os.makedirs(self.fs)
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs",
                                   self.fs], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.skipTest("cannot run mount: %s" % exc)
        if done.returncode != 0:
            self.skipTest("mount -t tmpfs failed: %s" % done.stderr.strip())
        self.addCleanup(self.unmount)
        state = os.path.join(self.fs, "state")
        self.daemon.config["state_dir"] = self.daemon.state_dir = state
        self.filler = os.path.join(self.fs, "filler")
        self.acked, self.refused = {}, []
        self.tags = 0

    def unmount(self):
        self._stop_daemon()         # it holds files on the tmpfs
        done = subprocess.run(["umount", self.fs], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", self.fs], capture_output=True, timeout=30)

    def fill(self):
        """Write to the filler file until the tmpfs is full, down to the last byte."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (1 << 16, 4096, 1):
                while True:
                    try:
                        os.write(fd, b"\0" * chunk)
                    except OSError as exc:
                        self.assertEqual(exc.errno, errno.ENOSPC)
                        break
        finally:
            os.close(fd)

    def add(self, conn, big=False):
        """One add; an ok reply is remembered as acknowledged, an error must be io_error."""
        self.tags += 1
        tag = "t%d" % self.tags
        reply = conn.call(op="add", target=TARGET, args=[tag, self.BIG if big else ""])
        if reply["ok"]:
            self.acked[reply["id"]] = tag
        else:
            self.assertEqual(reply["error"]["code"], "io_error", reply)
            self.refused.append(tag)
        return reply

    def assert_reads_work(self, conn):
        """On `conn` and on a new connection: hello, stats, get and list all answer."""
        fresh = self.daemon.raw()
        self.addCleanup(fresh.close)
        for c in (conn, fresh):
            self.assertEqual(c.call(op="hello")["ok"], True)
            stats = c.call(op="stats")
            self.assertTrue(stats["ok"], stats)
            self.assertEqual(stats["counts"]["pending"], len(self.acked), stats)
            some = min(self.acked)
            got = c.call(op="get", id=some)
            self.assertTrue(got["ok"], got)
            self.assertEqual(got["job"]["args"][0], self.acked[some])
            listed = c.call(op="list", limit=1000)
            self.assertTrue(listed["ok"], listed)
            self.assertEqual({j["id"]: j["args"][0] for j in listed["jobs"]}, self.acked)
        fresh.close()

    def assert_exactly_acked_on_disk(self):
        self.daemon.kill()
        self.daemon.start()
        jobs = list_all(self.daemon)
        self.assertEqual({j["id"]: j["args"][0] for j in jobs}, self.acked,
                         "after SIGKILL: exactly the acknowledged jobs (refused: %s)"
                         % self.refused)

    def test_enospc_is_refused_reads_go_on_and_space_coming_back_heals(self):
        d = self.daemon
        self.assertTrue(d.call(op="pause")["ok"])
        conn = d.raw()
        self.addCleanup(conn.close)
        for _ in range(5):
            self.assertTrue(self.add(conn)["ok"])
        self.assertTrue(self.add(conn, big=True)["ok"])

        self.fill()
        for _ in range(10):                     # an ok here was a write that still fitted
            if not self.add(conn, big=True)["ok"]:
                break
        self.assertTrue(self.refused, "no add was refused on a full disk")
        self.fill()                             # what a failed write gave back is taken again
        for big in (True, False, True):
            reply = self.add(conn, big=big)
            if big:
                self.assertFalse(reply["ok"], "a 16 KiB add acknowledged on a full disk")
        batch = conn.call(op="add_batch", jobs=[{"target": TARGET, "args": ["batch", self.BIG]}])
        self.assertFalse(batch["ok"], batch)
        self.assertEqual(batch["error"]["code"], "io_error")
        self.assert_reads_work(conn)

        # A crash while the disk is full: the acknowledged jobs are all on it, and a daemon
        # starting on the full disk serves reads and refuses writes.
        conn.close()
        self.assert_exactly_acked_on_disk()
        conn = d.raw()
        self.addCleanup(conn.close)
        self.assertFalse(self.add(conn, big=True)["ok"])
        self.assert_reads_work(conn)

        os.unlink(self.filler)
        wait_until(lambda: self.add(conn)["ok"], 10, interval=0.05,
                   message="an add to succeed once space is back")
        for big in (False, True, False):
            self.assertTrue(self.add(conn, big=big)["ok"])
        batch = conn.call(op="add_batch", jobs=[{"target": TARGET, "args": ["t-batch%d" % i, ""]}
                                                for i in range(3)])
        self.assertTrue(batch["ok"], batch)
        self.acked.update((job_id, "t-batch%d" % i) for i, job_id in enumerate(batch["ids"]))
        self.assert_reads_work(conn)
        conn.close()
        self.assert_exactly_acked_on_disk()
        self.assertGreaterEqual(len(self.refused), 4)


####################################################################################################
#  EIO from fdatasync in a real Daemon object
####################################################################################################

def copy_if_there(src, dst):
    """shutil.copy2, but a file gone meanwhile is left out: a fold's child deletes the journals
    its snapshot (already in place) covers while a test copies state_dir."""
    try:
        shutil.copy2(src, dst)
    except FileNotFoundError:
        pass


class InProcessDaemonCase(unittest.TestCase):
    """A Daemon object in this process, driven one loop pass at a time by call()."""

    START_METHOD = "spawn"

    def setUp(self):
        self.boot()

    def boot(self):
        """A new daemon on a new state_dir (self.d, self.conn, self.state)."""
        tmp = tempfile.TemporaryDirectory(prefix="jr-eio-")
        self.addCleanup(tmp.cleanup)
        root = tmp.name
        self.state = os.path.join(root, "state")
        cfg = jr.load_config(None, {"socket": os.path.join(root, "d.sock"),
                                    "state_dir": self.state, "log_dir": os.path.join(root, "logs"),
                                    "start_method": self.START_METHOD, "workers": 1,
                                    "job_paths": [ROOT]})
        self.stderr = io.StringIO()         # what the daemon prints about failed writes
        patcher = mock.patch.object(sys, "stderr", self.stderr)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.d = in_process_daemon(self, cfg)
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(cfg.socket)
        self.addCleanup(self.conn.close)
        self.inbuf = b""

    def call(self, **req):
        return self.replies(req)[0]

    def replies(self, *reqs, expect=None, timeout=10):
        """Send `reqs` at once (pipelined: the daemon reads them in one pass) and return
        their replies (or `expect` replies), running passes until all have come."""
        expect = len(reqs) if expect is None else expect
        self.conn.sendall(b"".join(json.dumps(req).encode() + b"\n" for req in reqs))
        deadline = time.monotonic() + timeout
        while self.inbuf.count(b"\n") < expect:
            self.assertLess(time.monotonic(), deadline, "no replies to %r" % (reqs,))
            self.d.run_pass(0.01)
            sel = selectors.DefaultSelector()
            sel.register(self.conn, selectors.EVENT_READ)
            if sel.select(0):
                data = self.conn.recv(1 << 20)
                self.assertTrue(data, "the daemon hung up")
                self.inbuf += data
            sel.close()
        lines = self.inbuf.split(b"\n")
        self.inbuf = b"\n".join(lines[expect:])
        return [json.loads(line) for line in lines[:expect]]

    def add(self, tag):
        return self.call(op="add", target=TARGET, args=[tag], delay=3600)

    def on_disk(self):
        """The jobs (id -> tag) a restart would load, from a copy of state_dir."""
        return {i: r["args"][0] for i, r in self.loaded_copy().items()}

    def states_on_disk(self, lost=None):
        """The jobs (id -> state) a restart would load."""
        return {i: r["state"] for i, r in self.loaded_copy(lost).items()}

    def loaded_copy(self, lost=None):
        """The records a restart would load, from a copy of state_dir. `lost` = (inode, start,
        end): what a failed fsync of that file lost (Linux may drop such pages while reads
        still see them until they are evicted): zeros in the copy, if the file is still there.
        The caller keeps that file open, so that its inode number names no other file."""
        dup = self.state + "-copy-%d" % time.monotonic_ns()
        shutil.copytree(self.state, dup, ignore=shutil.ignore_patterns("lock"),
                        copy_function=copy_if_there)
        if lost is not None:
            for name in os.listdir(self.state):
                path = os.path.join(self.state, name)
                if os.path.isfile(path) and os.stat(path).st_ino == lost[0]:
                    with open(os.path.join(dup, name), "r+b") as f:
                        size = f.seek(0, os.SEEK_END)
                        if size > lost[1]:
                            f.seek(lost[1])
                            f.write(b"\0" * (min(lost[2], size) - lost[1]))
        store = jr.Store(dup, fsync=False)
        try:
            return store.load()[1]
        finally:
            store.close()


class DiskErrorInProcessTest(InProcessDaemonCase):
    """With os.fdatasync and os.fsync failing with EIO while the test says so."""

    def test_eio_on_fdatasync_is_refused_undone_and_repaired(self):
        acked = {}
        for tag in ("a", "b"):
            reply = self.add(tag)
            self.assertTrue(reply["ok"], reply)
            acked[reply["id"]] = tag
        eio = OSError(errno.EIO, "injected EIO")
        # Both: a snapshot (the repair) that still worked would make the add durable, rightly.
        with mock.patch.object(jr.os, "fdatasync", side_effect=eio), \
                mock.patch.object(jr.os, "fsync", side_effect=eio):
            for tag in ("c", "d"):
                reply = self.add(tag)
                self.assertFalse(reply["ok"], reply)
                self.assertEqual(reply["error"]["code"], "io_error", reply)
            batch = self.call(op="add_batch", jobs=[{"target": TARGET, "args": ["e"]}])
            self.assertEqual(batch["error"]["code"], "io_error", batch)
            stats = self.call(op="stats")
            self.assertEqual(stats["counts"]["pending"], 2, "the refused adds were not undone")
            listed = self.call(op="list")
            self.assertEqual({j["id"]: j["args"][0] for j in listed["jobs"]}, acked)
            self.assertTrue(self.call(op="get", id=min(acked))["ok"])
            self.assertEqual(self.call(op="hello")["protocol"], 1)
        self.assertEqual(self.on_disk(), acked)

        def healed():
            reply = self.add("f")
            if reply["ok"]:
                acked[reply["id"]] = "f"
            else:
                self.assertEqual(reply["error"]["code"], "io_error", reply)
            return reply["ok"]
        wait_until(healed, 10, interval=0.05, message="an add to succeed after the EIO")
        self.assertEqual(self.on_disk(), acked)
        self.assertGreater(max(acked), 2)

    def test_a_failure_at_each_call_of_each_write_path_never_gives_a_false_ok(self):
        # os.write (ENOSPC), os.fdatasync and os.fsync (EIO) on the state files fail once, at
        # their Nth call; a mix of changing requests runs. Every reply that said ok is on
        # disk, every io_error left nothing, the state loads, and the daemon serves on.
        # Snapshots every few changes (a journal over 600 bytes), so that their writes and
        # fsyncs are among the calls that fail.
        for name, code in (("write", errno.ENOSPC), ("fdatasync", errno.EIO),
                           ("fsync", errno.EIO)):
            for n in range(1, 9):
                with self.subTest(fails=name, at_call=n), \
                        mock.patch.object(jr, "JOURNAL_MIN_COMPACT", 600), \
                        mock.patch.object(jr, "FOLD_RETRY", 0.0):
                    self.boot()
                    self.sweep_once(name, code, n)

    def sweep_once(self, name, code, n):
        real = getattr(os, name)
        calls = multiprocessing.sharedctypes.RawArray("q", 1)   # a fold's child counts too
        synced = {}                     # inode -> its size at its last good fdatasync
        lost = []                       # what the failed fdatasync lost (states_on_disk)
        held = {}                       # inode -> an fd that keeps it from being reused

        def flaky(fd, *args):
            try:
                ours = os.readlink("/proc/self/fd/%d" % fd).startswith(self.state)
            except OSError:
                ours = False
            if ours:
                calls[0] += 1
                st = os.fstat(fd)
                if st.st_ino not in held:
                    # Keep every file seen open, so that no inode number in `synced` or
                    # `lost` is freed and given to a later file (one that would be zeroed).
                    held[st.st_ino] = os.dup(fd)
                    self.addCleanup(os.close, held[st.st_ino])
                if calls[0] == n:
                    if name == "fdatasync":
                        lost.append((st.st_ino, synced.get(st.st_ino, 0), st.st_size))
                    raise OSError(code, "injected " + errno.errorcode[code])
                if name == "fdatasync":
                    synced[st.st_ino] = st.st_size
            return real(fd, *args)
        model = {}                      # id -> state, from the replies that said ok
        self.assertTrue(self.call(op="pause")["ok"])        # a retried job must not start
        deadline = time.monotonic() + 20
        with mock.patch.object(jr.os, name, flaky):
            # 12 steps, and more while the Nth call has not come yet: a fold runs in a child,
            # and on a loaded machine its fsyncs may come after the 12th step.
            for step in itertools.count():
                if step >= 12 and (calls[0] >= n or time.monotonic() > deadline):
                    break
                job_ids = sorted(model)
                kind = step % 4
                if kind == 0 or not job_ids:
                    reply = self.call(op="add", target=TARGET, args=[step], delay=3600)
                    new = [reply["id"]] if reply["ok"] else []
                elif kind == 1:
                    reply = self.call(op="add_batch", jobs=[
                        {"target": TARGET, "args": [step, k], "delay": 3600} for k in range(3)])
                    new = reply["ids"] if reply["ok"] else []
                elif kind == 2:
                    pending = [i for i in job_ids if model[i] == "pending"]
                    reply = self.call(op="cancel", id=pending[0] if pending else job_ids[0])
                    new = []
                    if reply["ok"]:
                        model[reply["job"]["id"]] = "cancelled"
                else:
                    done = [i for i in job_ids if model[i] == "cancelled"]
                    reply = self.call(op="retry", id=done[0] if done else job_ids[0])
                    new = []
                    if reply["ok"]:
                        model[reply["job"]["id"]] = "pending"
                if not reply["ok"]:
                    self.assertIn(reply["error"]["code"], ("io_error", "invalid_state"), reply)
                for job_id in new:
                    model[job_id] = "pending"
                self.assertEqual(self.states_on_disk(*lost), model,
                                 "after step %d: %r" % (step, reply))
        self.assertGreaterEqual(calls[0], n, "the failure was injected")
        self.assertGreater(self.d.store.gen, 1, "no snapshot was taken")
        self.assertTrue(self.call(op="hello")["ok"])

    def test_a_wait_never_reports_an_end_that_is_not_on_disk(self):
        """That a job ended is bookkeeping (fsynced within SYNC_DELAY), but a `wait` that reports
        it is an acknowledgement: while the disk fails, both a wait that was waiting when the
        job ended and one that comes afterwards get io_error, never a false "succeeded"."""
        job_id = self.call(op="add", target=TARGET, args=["w"])["id"]
        eio = OSError(errno.EIO, "injected EIO")
        with mock.patch.object(jr.os, "fdatasync", side_effect=eio), \
                mock.patch.object(jr.os, "fsync", side_effect=eio):
            waiting = self.call(op="wait", id=job_id, timeout=60)     # the job runs meanwhile
            self.assertEqual(waiting["error"]["code"], "io_error", waiting)
            self.assertEqual(self.d.jobs.jobs[job_id].state, "succeeded", "it did end")
            after = self.call(op="wait", id=job_id)
            self.assertEqual(after["error"]["code"], "io_error", after)
            self.assertEqual(self.states_on_disk(), {job_id: "pending"})

        def healed():
            reply = self.call(op="wait", id=job_id)
            if not reply["ok"]:
                self.assertEqual(reply["error"]["code"], "io_error", reply)
            return reply["ok"] and reply
        reply = wait_until(healed, 10, interval=0.05, message="a wait to succeed after the EIO")
        self.assertEqual(reply["job"]["state"], "succeeded", reply)
        self.assertEqual(self.states_on_disk(), {job_id: "succeeded"})

    def test_a_wait_for_a_job_that_ended_long_ago_is_answered_while_the_disk_fails(self):
        job_id = self.add("old")["id"]
        self.assertTrue(self.call(op="cancel", id=job_id)["ok"])      # its end is durable
        eio = OSError(errno.EIO, "injected EIO")
        with mock.patch.object(jr.os, "fdatasync", side_effect=eio), \
                mock.patch.object(jr.os, "fsync", side_effect=eio):
            self.assertEqual(self.add("new")["error"]["code"], "io_error")    # now broken
            self.assertIsNotNone(self.d.store.broken)
            reply = self.call(op="wait", id=job_id)
        self.assertEqual((reply["ok"], reply["done"], reply["job"]["state"]),
                         (True, True, "cancelled"), reply)

    def test_a_wait_after_a_change_that_is_undone_is_answered_not_left_hanging(self):
        job_id = self.add("r")["id"]
        self.assertTrue(self.call(op="cancel", id=job_id)["ok"])
        eio = OSError(errno.EIO, "injected EIO")
        with mock.patch.object(jr.os, "fdatasync", side_effect=eio), \
                mock.patch.object(jr.os, "fsync", side_effect=eio):
            new_id = self.d.jobs.next_id
            add, wait_new, retry, wait_old, hello = self.replies(
                {"op": "add", "target": TARGET, "args": ["n"], "delay": 3600},
                {"op": "wait", "id": new_id}, {"op": "retry", "id": job_id},
                {"op": "wait", "id": job_id}, {"op": "hello"})
        self.assertEqual([r.get("error", {}).get("code") for r in (add, wait_new, retry, wait_old)],
                         ["io_error"] * 4, (add, wait_new, retry, wait_old))
        self.assertTrue(hello["ok"])
        self.assertEqual(self.d.waiters, {})
        self.assertEqual(self.d.jobs.jobs[job_id].state, "cancelled")
        self.assertNotIn(new_id, self.d.jobs.jobs)

    def test_a_wait_that_times_out_as_its_job_ends_reports_the_end(self):
        job_id = self.call(op="add", target="examples.jobs:DelayedJob", args=[0.2])["id"]
        wait_until(lambda: (self.d.run_pass(0.01), self.d.attempts.get(job_id))[1]
                   and self.d.attempts[job_id].pid, 20, interval=0, message="the job to start")
        pid = self.d.attempts[job_id].pid
        self.conn.sendall(json.dumps({"op": "wait", "id": job_id, "timeout": 0.05}).encode()
                          + b"\n")
        wait_until(lambda: (self.d.run_pass(0), job_id in self.d.waiters)[1], 10, interval=0,
                   message="the wait to be taken")
        since = time.monotonic()

        def exited_and_expired():       # our child: a zombie until the next pass reaps it
            return proc_state(pid)[0] == "Z" and time.monotonic() > since + 0.1
        wait_until(exited_and_expired, 20, message="the job to exit, the wait to time out")
        self.d.run_pass(0)              # both in one pass: the end, then the expired timer
        [reply] = self.replies(expect=1)
        self.assertEqual((reply["done"], reply["job"]["state"]), (True, "succeeded"), reply)

    def test_a_wait_for_an_ended_job_makes_the_end_durable_first(self):
        with mock.patch.object(jr, "SYNC_DELAY", 3600):     # the end stays written, unsynced
            job_id = self.call(op="add", target=TARGET, args=["s"])["id"]

            def ended():
                self.d.run_pass(0.01)
                return self.d.jobs.jobs[job_id].state == "succeeded"
            wait_until(ended, 20, interval=0, message="the job to end")
            self.assertIsNotNone(self.d.store.sync_due(), "the end should not be synced yet")
            self.assertEqual(self.states_on_disk()[job_id], "succeeded", "but written")
            with mock.patch.object(jr.os, "fdatasync", wraps=os.fdatasync) as fdatasync:
                reply = self.call(op="wait", id=job_id)
            self.assertEqual(reply["job"]["state"], "succeeded", reply)
            self.assertGreaterEqual(fdatasync.call_count, 1, "replied before the fsync")
            self.assertIsNone(self.d.store.sync_due())


class JobRunsOnceItsStartIsWrittenTest(InProcessDaemonCase):
    """The job's process gets its spec (and so runs the job) only once the journal holds its
    pid: a daemon killed in between would otherwise restart not knowing which process group to
    kill, and what the job had started could run on beside its next attempt."""

    def test_the_spec_goes_out_only_after_the_pid_is_written(self):
        journal = os.path.join(self.state, "journal.jsonl")
        seen = []
        send_spec = jr.Runner._send_spec

        def spying(runner, att):
            with open(journal, "rb") as f:
                seen.append((att.pid, f.read()))
            return send_spec(runner, att)
        with mock.patch.object(jr.Runner, "_send_spec", spying):
            job_id = self.call(op="add", target=TARGET, args=["x"])["id"]
            reply = self.call(op="wait", id=job_id, timeout=60)
        self.assertEqual(reply["job"]["state"], "succeeded", reply)
        self.assertTrue(seen, "the spec was never sent")
        pid, written = seen[0]
        self.assertIsNotNone(pid, "the spec went out before the pid was known")
        records = [json.loads(line).get("job") for line in written.splitlines()]
        self.assertIn((job_id, "running", pid), [(r["id"], r["state"], r.get("pid"))
                                                 for r in records if r])


class JobRunsOnceItsStartIsWrittenZygoteTest(JobRunsOnceItsStartIsWrittenTest):
    START_METHOD = "zygote"


class ZygoteGoneAtForkTest(InProcessDaemonCase):
    START_METHOD = "zygote"

    def test_a_fork_request_the_zygote_cannot_take_is_no_attempt(self):
        # The zygote's socket refuses the request (it died; its EOF not yet seen): that start
        # failed for a reason of the host, so it is no attempt (SPEC §2): the job starts
        # again, rather than being kept as running with no process or counted as failed.
        send_fds, calls = socket.send_fds, []

        def refusing_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise BrokenPipeError(errno.EPIPE, "injected EPIPE")
            return send_fds(*args, **kwargs)
        with mock.patch.object(jr.socket, "send_fds", refusing_once):
            job_id = self.call(op="add", target=TARGET, args=["z"], retries=2,
                               retry_delay=0.01)["id"]
            reply = self.call(op="wait", id=job_id, timeout=30)
        self.assertEqual((reply["job"]["state"], reply["job"]["attempts"]), ("succeeded", 1),
                         reply)
        self.d.log.flush()
        errors = os.path.join(os.path.dirname(self.state), "logs", "background_jobs_errors.log")
        self.assertFalse(os.path.exists(errors) and os.path.getsize(errors), "a failed attempt")
        self.assertEqual((self.d.runner.active, self.d.attempts), ({}, {}))


####################################################################################################
#  A job that ignores SIGTERM, running when the daemon is SIGKILLed
####################################################################################################

JOB_MODULE = "durability_jobs"
# The job's module cannot import this one: it gets proc_state() as source, one definition.
JOB_SOURCE = '''
import json, os, signal, subprocess, sys, time

''' + inspect.getsource(proc_state) + '''

def stubborn(pids_file, limit=120):
    """Attempt 1 ignores SIGTERM (and so does its grandchild) and never ends by itself.
    Later attempts report whether attempt 1's processes were still running when they began."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    attempt = int(os.environ["JOBRUNNER_ATTEMPT"])
    if attempt == 1:
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                  "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                  "time.sleep(%d)" % limit])
        procs = {"job": [os.getpid(), proc_state(os.getpid())[1]],
                 "grandchild": [child.pid, proc_state(child.pid)[1]]}
        with open(pids_file + ".tmp", "w") as f:
            json.dump(procs, f)
        os.replace(pids_file + ".tmp", pids_file)
        time.sleep(limit)
        return "attempt 1 was never stopped"
    with open(pids_file) as f:
        procs = json.load(f)
    alive = {}
    for name, (pid, start) in procs.items():
        st = proc_state(pid)
        alive[name] = st is not None and st[1] == start and st[0] not in ("Z", "X")
    return {"attempt": attempt, "pid": os.getpid(), "old_running_at_start": alive}
'''


class StubbornOrphanTest(DaemonTestCase):
    config = {"allow": ["examples.*:*", JOB_MODULE + ":*"], "kill_grace": 1}

    def prepare(self):
        self.write_job_module(JOB_MODULE, JOB_SOURCE)

    @staticmethod
    def kill_if_running(pid, start):
        """Cleanup after a failure: no stubborn process of ours outlives the test."""
        if running(pid, start):
            os.kill(pid, signal.SIGKILL)

    def ignores_sigterm(self, pid):
        with open("/proc/%d/status" % pid) as f:
            mask = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", f.read(), re.M).group(1), 16)
        return bool(mask & (1 << (signal.SIGTERM - 1)))

    def test_sigterm_ignoring_orphans_are_gone_before_the_next_attempt(self):
        d = self.daemon
        pids_file = os.path.join(self.root, "attempt1.json")
        job_id = d.add(JOB_MODULE + ":stubborn", args=[pids_file], retries=1, retry_delay=0,
                       backoff="fixed")
        wait_until(lambda: os.path.exists(pids_file), 20, message="attempt 1 to start")
        with open(pids_file) as f:
            procs = json.load(f)
        (pid, pid_start), (grandchild, gc_start) = procs["job"], procs["grandchild"]
        self.addCleanup(self.kill_if_running, pid, pid_start)
        self.addCleanup(self.kill_if_running, grandchild, gc_start)
        self.assertEqual(d.wait_state(job_id, "running")["pid"], pid)
        self.assertTrue(self.ignores_sigterm(pid) and self.ignores_sigterm(grandchild))

        d.kill()
        # The job process itself dies with the daemon (PR_SET_PDEATHSIG); its grandchild is left
        # for the next daemon to find.
        self.assertTrue(running(grandchild, gc_start), "the grandchild outlives the daemon")
        d.start()
        job = d.wait_job(job_id)
        self.assertEqual(job["state"], "succeeded", job)
        self.assertEqual(job["attempts"], 2)
        result = job["result"]
        self.assertEqual(result["old_running_at_start"], {"job": False, "grandchild": False},
                         "attempt 2 started while attempt 1's processes still ran")
        self.assertNotEqual(result["pid"], pid)
        self.assertFalse(running(pid, pid_start))
        self.assertFalse(running(grandchild, gc_start))

        events = [e for e in d.events() if e.get("job") == str(job_id)]
        names = [(e["event"], e.get("attempt")) for e in events]
        self.assertEqual(names, [("queued", None), ("started", "1/2"), ("interrupted", "1/2"),
                                 ("started", "2/2"), ("succeeded", "2/2")], events)
        self.assertEqual(events[1].get("pid"), str(pid))
        self.assertEqual(events[2].get("pid"), str(pid))
        self.assertEqual(events[3].get("pid"), str(result["pid"]))


class ReusedPidTest(unittest.TestCase):
    """Jobs found `running` at start-up: a process with the recorded pid is killed only if it
    also has the recorded start time; one that merely got the pid again is left alone."""

    def test_only_the_process_with_the_recorded_start_time_is_killed(self):
        tmp = tempfile.TemporaryDirectory(prefix="jr-pid-")
        self.addCleanup(tmp.cleanup)
        procs = []
        for _ in range(2):      # stand-ins: each leads its own process group, as attempts do
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                    start_new_session=True)
            self.addCleanup(proc.wait)
            self.addCleanup(proc.kill)
            procs.append(proc)
        ours, stranger = procs
        state = os.path.join(tmp.name, "state")
        os.mkdir(state, 0o750)          # the daemon refuses a group-writable one (umask 002)
        store = jr.Store(state, fsync=False)
        store.load()
        now = time.time()
        jobs = [jr.Job(id=i, target=TARGET, method=None, args=[i], kwargs={}, priority=0,
                       state="running", attempts=1, retries=3, retry_delay=1.0,
                       backoff="exponential", timeout=None, created_at=now, run_at=now, uid=0,
                       pid=proc.pid, pid_start=jr.proc_start_time(proc.pid) - (i == 2))
                for i, proc in ((1, ours), (2, stranger))]
        store.snapshot({"next_id": 3, "paused": True}, jobs)
        store.close()
        cfg = jr.load_config(None, {"socket": os.path.join(tmp.name, "d.sock"),
                                    "state_dir": state, "log_dir": os.path.join(tmp.name, "logs"),
                                    "start_method": "spawn", "job_paths": [ROOT]})
        with mock.patch.object(sys, "stderr", io.StringIO()):
            daemon = in_process_daemon(self, cfg)
        self.assertEqual(ours.wait(timeout=10), -signal.SIGKILL, "the attempt's own process")
        self.assertIsNone(stranger.poll(), "a process that only reuses the pid was killed")
        for job_id in (1, 2):
            job = daemon.jobs.jobs[job_id]
            self.assertEqual((job.state, job.pid), ("pending", None))
            self.assertIn("interrupted", job.error)
        daemon.log.flush()
        with open(os.path.join(tmp.name, "logs", "background_jobs.log")) as f:
            interrupted = [line for line in f if " event=interrupted " in line]
        self.assertEqual(len(interrupted), 2, interrupted)


if __name__ == "__main__":
    unittest.main()
