"""Compaction and pruning without holding the loop (SPEC §3 "no compaction, prune or reply holds
it for more than 100 ms, also at 1M jobs"), and the crash safety of the background fold (§3a).

    FoldLayoutTest      the files as they are between each step of a background fold (journal
                        rotated, new journal, changes after the fork, the child's temp file whole
                        or torn, renamed in, covered journal deleted) load to exactly the
                        acknowledged jobs, and work goes on from each of them.
    FoldCrashTest       Store.fold() .. reap_fold() "dies" before each system call the parent
                        makes (the child is real): the state loads to what was acknowledged.
    OldFormatTest       a state_dir written by the code before background folds (fixture bytes
                        made by it) loads, also the crash state "new snapshot, old journal".
    FoldFailureTest     a child that cannot write (ENOSPC) leaves the old files in force, is
                        tried again, never two at once; once the disk works the fold lands.
    FoldDaemonTest      a real daemon whose fold child is held (test hook): the loop serves and
                        journals meanwhile, the child holds none of the daemon's files; SIGKILL
                        during the fold (the child dies with it) then restart keeps every
                        acknowledged job; a graceful stop during the fold leaves a whole queue.json.
    PruneTest           a prune of one job out of a large snapshot is one `del` line (the old code
                        rewrote the whole snapshot); a large prune goes in durable steps, the
                        reply after the last, output files gone by then, pipelined order kept.
"""
import errno
import json
import os
import re
import select
import shutil
import signal
import tempfile
import time
import unittest
from unittest import mock

from tests.support import DaemonTestCase, daemon_env, wait_until
from tests.test_durability import (TARGET, Crash, InProcessDaemonCase, SyscallCrasher,
                                   list_all, queue_gen, record)

import jobrunnerd as jr  # noqa: E402  (tests.support put ROOT on sys.path)


OLDER_JOURNAL = re.compile(r"journal\.\d+\.jsonl")     # a journal a fold has not covered yet
FOLD_TEMP = re.compile(r"queue\.json\.\d+\.tmp")          # a fold's snapshot being written


def load(state):
    """(meta, records) a restart would see, from a fresh Store (no lock: nothing removed)."""
    store = jr.Store(state, fsync=False)
    try:
        return store.load()
    finally:
        store.close()


def names(state):
    return sorted(n for n in os.listdir(state) if n != "lock")


def jobs_of(records):
    return {i: jr.Job.from_stored(dict(r)) for i, r in records.items()}


def wait_fold(store, timeout=20.0):
    """Drive reap_fold() until the fold under way has ended (its child reaped)."""
    results = []

    def done():
        results.append(store.reap_fold())
        return store.folding is None
    wait_until(done, timeout, interval=0.005, message="the fold to end")
    return [r for r in results if r is not None]


####################################################################################################
#  Every step of a background fold, as files on disk
####################################################################################################

class FoldBase(unittest.TestCase):
    """Snapshot generation 1 holds jobs 1-3; the journal then runs job 1, adds 4, deletes 3,
    pauses (BEFORE). A fold starts; after the fork the journal takes job 1's success and job 5
    (AFTER): acknowledged while the child writes."""

    BEFORE = ({"next_id": 5, "paused": True},
              {1: record(1, state="running", attempts=1, pid=4242), 2: record(2), 4: record(4)})
    AFTER = ({"next_id": 6, "paused": True},
             {1: record(1, state="succeeded", attempts=1, finished_at=200.0), 2: record(2),
              4: record(4), 5: record(5)})

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="jr-store-")
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name

    def build(self, state, fsync=True):
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
        self.assertEqual(load(state), self.BEFORE)
        return store

    def after_fork(self, store):
        """The changes acknowledged while the child works."""
        store.append({"job": self.AFTER[1][1]})
        store.append({"job": record(5)})
        store.commit()

    def assert_goes_on(self, state, loaded, where):
        """A daemon's restart on this state (it holds the lock: leftovers go): a change, a
        background fold, another change; nothing lost, nothing replayed twice."""
        meta, records = json.loads(json.dumps(loaded[0])), dict(loaded[1])
        store = jr.Store(state, fsync=False)
        try:
            store.lock()
            self.assertEqual(store.load(), (meta, records), where)
            self.assertEqual([n for n in names(state) if FOLD_TEMP.fullmatch(n)], [], where)
            store.append({"job": record(10)})
            store.commit()
            records[10] = record(10)
            meta["next_id"] = 11
            store.fold(meta, jobs_of(records))
            victim = min(records)
            store.append({"del": [victim]})
            store.commit()
            del records[victim]
            self.assertEqual(wait_fold(store), [True], where)
            self.assertEqual(load(state), (meta, records), where + ", after a fold")
            self.assertEqual(names(state), ["journal.jsonl", "queue.json"], where)
        finally:
            store.close()


class FoldLayoutTest(FoldBase):

    def copy(self, src, name, change=None):
        dst = os.path.join(self.tmp, name)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock"))
        if change:
            change(dst)
        return dst

    def test_the_files_between_each_step_load_to_the_acknowledged_jobs(self):
        state = os.path.join(self.tmp, "state")
        store = self.build(state)
        layouts = [("before", self.copy(state, "before"), self.BEFORE)]

        def rotated_only(d):            # journal renamed, the new one not yet there
            os.rename(os.path.join(d, "journal.jsonl"), os.path.join(d, "journal.1.jsonl"))
        layouts.append(("rotated", self.copy(state, "rotated", rotated_only), self.BEFORE))

        def new_journal_torn(d):        # ... and its temp file half written
            rotated_only(d)
            with open(os.path.join(d, "journal.jsonl.tmp"), "wb") as f:
                f.write(b'{"ge')
        layouts.append(("new-journal-temp", self.copy(state, "nj", new_journal_torn),
                        self.BEFORE))

        gen = store.gen
        store.fold(*self.BEFORE[0:1], jobs_of(self.BEFORE[1]))
        fold = store.folding
        self.assertEqual(store.gen, gen + 1)
        self.assertEqual(names(state)[:2], ["journal.%d.jsonl" % gen, "journal.jsonl"])
        layouts.append(("forked", self.copy(state, "forked"), self.BEFORE))
        self.after_fork(store)
        layouts.append(("changed-after-fork", self.copy(state, "changed"), self.AFTER))
        # The child says "ok" once its temp file is whole and fsynced; it waits for go then.
        self.assertTrue(select.select([fold.pipe], [], [], 20)[0], "the child never reported")
        temp = os.path.basename(fold.temp)
        self.assertIn(temp, names(state))
        layouts.append(("temp-written", self.copy(state, "temp"), self.AFTER))

        def torn_temp(d):
            path = os.path.join(d, temp)
            os.truncate(path, os.path.getsize(path) // 2)
        layouts.append(("temp-torn", self.copy(state, "torn", torn_temp), self.AFTER))

        def renamed(d):                 # renamed in, the covered journal not yet deleted
            os.rename(os.path.join(d, temp), os.path.join(d, "queue.json"))
        layouts.append(("renamed", self.copy(state, "renamed", renamed), self.AFTER))
        self.assertEqual(wait_fold(store), [True])
        self.assertEqual(names(state), ["journal.jsonl", "queue.json"])
        self.assertEqual(queue_gen(state), gen + 1)
        layouts.append(("done", self.copy(state, "done"), self.AFTER))
        store.close()

        for where, path, expected in layouts:
            with self.subTest(where):
                self.assertEqual(load(path), expected, where)
                self.assert_goes_on(path, expected, where)


class FoldCrashTest(FoldBase):

    def run_fold(self, store, crasher, acked):
        with crasher:
            store.fold(dict(self.BEFORE[0]), jobs_of(self.BEFORE[1]))
            self.after_fork(store)
            acked.append(True)
            wait_fold(store)

    def test_crash_before_each_system_call_of_the_parent(self):
        for fsync in (True, False):
            clean = ForkRecorder()
            self.run_fold(self.build(os.path.join(self.tmp, "clean-%s" % fsync), fsync),
                          clean, [])
            steps = clean.calls
            self.assertIn("replace journal.1.jsonl", steps)
            self.assertIn("replace queue.json", steps)
            for k in range(1, len(steps) + 2):
                where = "crash before call %d of %r" % (k, steps)
                with self.subTest(fsync=fsync, crash_at=k):
                    state = os.path.join(self.tmp, "k%d-%s" % (k, fsync))
                    store = self.build(state, fsync)
                    crasher = ForkRecorder(k)
                    journal_fd, acked = store.fd, []
                    try:
                        self.run_fold(store, crasher, acked)
                        crashed = False
                    except Crash:
                        crashed = True
                    self.assertEqual(crashed, k <= len(steps), where)
                    crasher.kill_children()         # they die with the parent
                    crasher.close_leftovers(store, journal_fd)
                    got = load(state)
                    self.assertIn(got, (self.BEFORE, self.AFTER), where)
                    if acked or not crashed:
                        self.assertEqual(got, self.AFTER, where + ": acknowledged, then lost")
                    if k == 1:
                        self.assertEqual(got, self.BEFORE, where)
                    self.assert_goes_on(state, got, where)


class ForkRecorder(SyscallCrasher):
    """SyscallCrasher that also remembers the children forked (to kill them as the kernel
    would when the parent dies) and the pipes made (to close them)."""

    def __enter__(self):
        super().__enter__()
        self.children = []
        real_fork, real_pipe = os.fork, os.pipe

        def fork():
            pid = real_fork()
            if pid:
                self.children.append(pid)
            return pid

        def pipe():
            fds = real_pipe()
            self.open_fds.update(fds)
            return fds
        self.more = [mock.patch.object(jr.os, "fork", fork), mock.patch.object(jr.os, "pipe", pipe)]
        for p in self.more:
            p.start()
        return self

    def wrap(self, name):
        """Only the parent "dies": the child (a real process) runs the real calls."""
        counted, real, parent = super().wrap(name), self.real[name], os.getpid()

        def call(*args, **kwargs):
            if os.getpid() != parent:
                return real(*args, **kwargs)
            return counted(*args, **kwargs)
        return call

    def __exit__(self, *exc):
        for p in reversed(self.more):
            p.stop()
        super().__exit__(*exc)

    def kill_children(self):
        for pid in getattr(self, "children", []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

    def close_leftovers(self, store, journal_fd):
        store.folding = None            # its fds are among those closed here
        for fd in list(self.open_fds):
            try:
                os.fstat(fd)
            except OSError:
                self.open_fds.discard(fd)
        super().close_leftovers(store, journal_fd)


####################################################################################################
#  A state_dir written before background folds
####################################################################################################

# Made by jobrunnerd.py at commit 637edc3 (Store.load, append, commit, snapshot), then a torn
# last line appended as a crash mid-write leaves it.
OLD_SNAPSHOT = (
    b'{"format":1,"gen":1,"next_id":4,"paused":false,"jobs":[\n'
    b'{"id":1,"target":"examples.jobs:echo","args":["a",1],"state":"pending","retries":1,'
    b'"timeout":3600,"created_at":100.0},\n'
    b'{"id":2,"target":"examples.jobs:echo","args":["a",2],"state":"pending","retries":1,'
    b'"timeout":3600,"created_at":100.0},\n'
    b'{"id":3,"target":"examples.jobs:echo","args":["a",3],"state":"pending","retries":1,'
    b'"timeout":3600,"key":"k3","created_at":100.0}\n]}\n')
OLD_JOURNAL = (
    b'{"gen":1}\n'
    b'{"job":{"id":1,"target":"examples.jobs:echo","args":["a",1],"state":"succeeded",'
    b'"attempts":1,"retries":1,"timeout":3600,"created_at":100.0,"finished_at":200.0,'
    b'"result":{"x":[1,"\xc3\xa9"]}}}\n'
    b'{"jobs":[{"id":4,"target":"examples.jobs:echo","args":["a",4],"priority":5,'
    b'"state":"pending","retries":1,"timeout":3600,"created_at":100.0},\t'
    b'{"id":5,"target":"examples.jobs:echo","args":["a",5],"kwargs":{"k":"v"},'
    b'"state":"pending","retries":1,"timeout":3600,"created_at":100.0}]}\n'
    b'{"del":[2]}\n{"paused":true}\n{"next_id":9}\n'
    b'{"job":{"id":6,"tar')
# The old snapshot() of that state, as a crash between its two renames leaves it: the new
# queue.json (generation 2) beside the old journal (generation 1, all in the snapshot).
OLD_SNAPSHOT_2 = (
    b'{"format":1,"gen":2,"next_id":9,"paused":true,"jobs":[\n'
    b'{"id":1,"target":"examples.jobs:echo","args":["a",1],"state":"succeeded","attempts":1,'
    b'"retries":1,"timeout":3600,"created_at":100.0,"finished_at":200.0,'
    b'"result":{"x":[1,"\xc3\xa9"]}},\n'
    b'{"id":3,"target":"examples.jobs:echo","args":["a",3],"state":"pending","retries":1,'
    b'"timeout":3600,"key":"k3","created_at":100.0},\n'
    b'{"id":4,"target":"examples.jobs:echo","args":["a",4],"priority":5,"state":"pending",'
    b'"retries":1,"timeout":3600,"created_at":100.0},\n'
    b'{"id":5,"target":"examples.jobs:echo","args":["a",5],"kwargs":{"k":"v"},'
    b'"state":"pending","retries":1,"timeout":3600,"created_at":100.0}\n]}\n')


def old_record(job_id, **fields):
    rec = {"id": job_id, "target": "examples.jobs:echo", "args": ["a", job_id],
           "state": "pending", "created_at": 100.0, "retries": 1, "timeout": 3600}
    rec.update(fields)
    return rec


OLD_STATE = ({"next_id": 9, "paused": True}, {
    1: old_record(1, state="succeeded", attempts=1, finished_at=200.0,
                  result={"x": [1, "\u00e9"]}),
    3: old_record(3, key="k3"), 4: old_record(4, priority=5), 5: old_record(5, kwargs={"k": "v"})})


class OldFormatTest(FoldBase):

    def write(self, name, snapshot, journal):
        state = os.path.join(self.tmp, name)
        os.makedirs(state)
        for file, data in (("queue.json", snapshot), ("journal.jsonl", journal)):
            with open(os.path.join(state, file), "wb") as f:
                f.write(data)
        return state

    def test_a_state_dir_of_the_old_code_loads_and_goes_on(self):
        for name, snapshot in (("torn-tail", OLD_SNAPSHOT), ("new-snapshot-old-journal",
                                                               OLD_SNAPSHOT_2)):
            with self.subTest(name):
                state = self.write(name, snapshot, OLD_JOURNAL)
                store = jr.Store(state, fsync=False)
                try:
                    self.assertEqual(store.load(), OLD_STATE)
                finally:
                    store.close()
                self.assertEqual(len(store.warnings), 1, store.warnings)     # the torn line
                self.assert_goes_on(state, OLD_STATE, name)


####################################################################################################
#  A fold's child that fails
####################################################################################################

class FoldFailureTest(InProcessDaemonCase):

    def test_a_child_that_cannot_write_leaves_the_old_files_and_is_tried_again(self):
        real_fsync, real_fork = os.fsync, os.fork
        full = [True]
        children = []

        def fsync(fd):                  # ENOSPC for a fold's temp snapshot while `full`
            if full[0] and FOLD_TEMP.fullmatch(os.path.basename(
                    os.readlink("/proc/self/fd/%d" % fd))):
                raise OSError(errno.ENOSPC, "injected ENOSPC")
            return real_fsync(fd)

        def fork():
            pid = real_fork()
            if pid:
                children.append(pid)
            return pid

        def alive(pid):
            try:
                with open("/proc/%d/stat" % pid) as f:
                    return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
            except OSError:
                return False
        acked = {}
        with mock.patch.object(jr.os, "fsync", fsync), mock.patch.object(jr.os, "fork", fork), \
                mock.patch.object(jr, "JOURNAL_MIN_COMPACT", 600), \
                mock.patch.object(jr, "FOLD_RETRY", 0.05, create=True):
            gen = queue_gen(self.state)

            def tried_thrice():
                reply = self.add("t%d" % len(acked))
                self.assertTrue(reply["ok"], reply)
                acked[reply["id"]] = "t%d" % len(acked)
                self.assertLessEqual(sum(map(alive, children)), 1, "two fold children at once")
                return len(children) >= 3 and self.d.store.folding is None
            wait_until(tried_thrice, 20, interval=0.01, message="a failed fold tried again")
            self.assertEqual(queue_gen(self.state), gen, "a failed fold replaced queue.json")
            self.assertIn("injected ENOSPC", getattr(self.d.store, "fold_error", ""))
            self.assertEqual(self.on_disk(), acked)
            self.assertEqual([n for n in names(self.state) if n.endswith(".tmp")], [])
            full[0] = False             # space is back: the next fold lands

            def landed():
                reply = self.add("u")
                acked[reply["id"]] = "u"
                return self.d.store.folding is None and queue_gen(self.state) != gen \
                    and names(self.state) == ["journal.jsonl", "queue.json"]
            wait_until(landed, 20, interval=0.01, message="a fold to land")
        self.assertEqual(self.on_disk(), acked)


####################################################################################################
#  A real daemon, its fold's child held (stopped) by the test's preamble
####################################################################################################

def fold_child(daemon_pid):
    """The pid of a stopped child of the daemon (the held fold), or None."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == daemon_pid and fields[0] == "T":
                return int(entry)
    return None


def gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


class FoldDaemonTest(DaemonTestCase):
    # A fold that takes its time: its child stops itself once it holds none of the daemon's
    # files, before it writes anything (the test sends SIGCONT, or kills the daemon).
    daemon_preamble = """
import os, signal
def _detach(keep, detach=jr.Fold._detach):
    detach(keep)
    os.kill(os.getpid(), signal.SIGSTOP)
jr.Fold._detach = staticmethod(_detach)
"""
    PAD = "p" * 2048                    # ~600 of these pass the 1 MiB journal threshold

    def add_many(self, c, n, tag):
        """n adds in add_batch requests of 100; returns {id: args} of the acknowledged ones."""
        acked = {}
        for start in range(0, n, 100):
            jobs = [{"target": TARGET, "args": [tag, i, self.PAD], "delay": 3600}
                    for i in range(start, min(n, start + 100))]
            reply = c.call(op="add_batch", jobs=jobs)
            self.assertTrue(reply["ok"], reply)
            acked.update((i, job["args"]) for i, job in zip(reply["ids"], jobs))
        return acked

    def hold_a_fold(self, c):
        """Add until a fold starts; returns (acked, child pid). The loop goes on meanwhile."""
        acked = {}
        for round_ in range(10):
            acked.update(self.add_many(c, 200, "r%d" % round_))
            if [n for n in names(self.daemon.state_dir) if OLDER_JOURNAL.fullmatch(n)]:
                break
        child = wait_until(lambda: fold_child(self.daemon.proc.pid), 10,
                           message="a fold's child (none: the fold ran in the loop?)")
        self.daemon.preamble = None     # a daemon started again folds on its own
        return acked, child

    def assert_all_there(self, acked):
        jobs = {j["id"]: j["args"] for j in list_all(self.daemon)}
        lost = sorted(set(acked) - set(jobs))
        self.assertEqual(lost, [], "acknowledged jobs lost")
        self.assertEqual({i: jobs[i] for i in acked}, acked)

    def test_sigkill_during_a_fold_keeps_every_acknowledged_job(self):
        d = self.daemon
        gen = queue_gen(d.state_dir)
        with d.raw() as c:
            acked, child = self.hold_a_fold(c)
            state = names(d.state_dir)
            self.assertTrue([n for n in state if OLDER_JOURNAL.fullmatch(n)], state)
            self.assertEqual(queue_gen(d.state_dir), gen)
            # The child holds none of the daemon's files: no socket, journal, lock or log.
            fds = {}
            for fd in os.listdir("/proc/%d/fd" % child):
                fds[int(fd)] = os.readlink("/proc/%d/fd/%s" % (child, fd))
            held = {fd: what for fd, what in fds.items()
                    if fd > 2 and not what.startswith("pipe:")}
            self.assertEqual(held, {}, "the fold's child holds the daemon's files")
            # The loop serves and journals while the child works.
            acked.update(self.add_many(c, 150, "during"))
            self.assertTrue(c.call(op="stats")["ok"])
        self.assertEqual(d.kill(), -signal.SIGKILL)
        wait_until(lambda: gone(child), 10, message="the fold's child to die with the daemon")
        d.start(env=daemon_env())
        self.assert_all_there(acked)
        # The restarted daemon folds what the dead one left (no held child now).
        with d.raw() as c:
            acked.update(self.add_many(c, 700, "after"))
        wait_until(lambda: names(d.state_dir) == ["journal.jsonl", "queue.json"]
                   and (queue_gen(d.state_dir) or 0) > (gen or 0), 20,
                   message="the restarted daemon to fold")
        self.assertEqual(d.kill(), -signal.SIGKILL)
        d.start(env=daemon_env())
        self.assert_all_there(acked)

    def test_a_graceful_stop_during_a_fold_leaves_a_whole_snapshot(self):
        d = self.daemon
        with d.raw() as c:
            acked, child = self.hold_a_fold(c)
            acked.update(self.add_many(c, 50, "during"))
        t0 = time.monotonic()
        self.assertEqual(d.stop(), 0, d.read_stderr())
        self.assertLess(time.monotonic() - t0, 15)
        self.assertTrue(gone(child))
        self.assertEqual(names(d.state_dir), ["journal.jsonl", "queue.json"])
        with open(os.path.join(d.state_dir, "journal.jsonl"), "rb") as f:
            self.assertEqual(len(f.read().splitlines()), 1, "the journal holds only its header")
        self.assertEqual({i: r["args"] for i, r in load(d.state_dir)[1].items()}, acked)

    def test_a_fold_that_goes_on_lands_and_deletes_what_it_covers(self):
        d = self.daemon
        gen = queue_gen(d.state_dir) or 0
        with d.raw() as c:
            acked, child = self.hold_a_fold(c)
            acked.update(self.add_many(c, 50, "during"))
            os.kill(child, signal.SIGCONT)
            wait_until(lambda: gone(child) and (queue_gen(d.state_dir) or 0) > gen
                       and names(d.state_dir) == ["journal.jsonl", "queue.json"], 20,
                       message="the fold to land")
            self.assertTrue(c.call(op="hello")["ok"])
        self.assertEqual({i: r["args"] for i, r in load(d.state_dir)[1].items()}, acked)


####################################################################################################
#  Prune: a del line, in durable steps
####################################################################################################

class PruneDaemonTest(DaemonTestCase):

    def test_a_prune_of_one_job_appends_a_del_line_and_rewrites_nothing(self):
        d = self.daemon
        pad = "p" * 2048
        with d.raw() as c:
            ids = []
            for start in range(0, 700, 100):
                reply = c.call(op="add_batch", jobs=[
                    {"target": TARGET, "args": [i, pad], "delay": 3600}
                    for i in range(start, start + 100)])
                self.assertTrue(reply["ok"], reply)
                ids += reply["ids"]
            # A fold made a snapshot of over 1 MiB (the threshold the journal passed).
            wait_until(lambda: names(d.state_dir) == ["journal.jsonl", "queue.json"]
                       and queue_gen(d.state_dir), 20, message="a fold")
            self.assertGreater(os.path.getsize(os.path.join(d.state_dir, "queue.json")),
                               jr.JOURNAL_MIN_COMPACT)
            gen = queue_gen(d.state_dir)
            self.assertTrue(c.call(op="cancel", id=ids[7])["ok"])
            self.assertEqual(c.call(op="prune"), {"ok": True, "removed": 1})
            self.assertTrue(c.call(op="hello")["ok"])        # a pass after the prune's
        self.assertEqual(queue_gen(d.state_dir), gen, "the prune of one job rewrote queue.json")
        self.assertEqual(names(d.state_dir), ["journal.jsonl", "queue.json"], "a fold started")
        with open(os.path.join(d.state_dir, "journal.jsonl"), "rb") as f:
            self.assertEqual(json.loads(f.read().splitlines()[-1]), {"del": [ids[7]]})
        self.assertEqual(d.kill(), -signal.SIGKILL)
        d.start()
        self.assertEqual(d.call(op="get", id=ids[7])["error"]["code"], "not_found")
        self.assertEqual(d.call(op="stats")["counts"]["pending"], 699)


class PruneStepsTest(InProcessDaemonCase):

    def finished(self, n):
        ids = self.call(op="add_batch", jobs=[{"target": TARGET, "args": ["f%d" % i],
                                               "delay": 3600} for i in range(n)])["ids"]
        replies = self.replies(*[{"op": "cancel", "id": i} for i in ids])
        self.assertTrue(all(r["ok"] for r in replies))
        return ids

    def test_a_large_prune_goes_in_durable_steps_and_answers_after_the_last(self):
        with mock.patch.object(jr, "PRUNE_SLICE", 5, create=True):
            keep = self.add("live")["id"]
            ids = self.finished(23)
            outputs = []
            for job_id in ids:                  # as if each had printed something
                path = self.d.runner.output_path(job_id)
                with open(path, "w") as f:
                    f.write("out\n")
                outputs.append(path)
            dels, append = [], self.d.store.append

            def spying(entry):
                if "del" in entry:
                    dels.append(entry["del"])
                append(entry)
            self.d.store.append = spying
            self.conn.sendall(b'{"op":"prune"}\n{"op":"stats"}\n')
            self.d.run_pass(0.5)
            # One step: 5 jobs gone, durably; no reply yet (nor to the stats behind it).
            self.assertEqual(len(self.on_disk()), 1 + 23 - 5)
            self.assertEqual(len(self.d.jobs.jobs), 1 + 23 - 5)
            replies = self.replies(expect=2)
            self.assertEqual(replies[0], {"ok": True, "removed": 23})
            self.assertEqual(replies[1]["counts"]["cancelled"], 0)      # in order, after it
            self.assertEqual([p for p in outputs if os.path.exists(p)], [],
                             "output files left when the reply came")
            self.assertEqual(list(self.on_disk()), [keep])
            self.assertEqual(dels, [ids[i:i + 5] for i in range(0, 23, 5)])

    def test_a_failing_step_answers_io_error_and_keeps_what_was_done(self):
        with mock.patch.object(jr, "PRUNE_SLICE", 5, create=True):
            ids = self.finished(12)
            self.conn.sendall(b'{"op":"prune"}\n')
            self.d.run_pass(0.5)                # step 1 is durable
            eio = OSError(errno.EIO, "injected EIO")
            with mock.patch.object(jr.os, "fdatasync", side_effect=eio), \
                    mock.patch.object(jr.os, "fsync", side_effect=eio):
                reply = self.replies(expect=1)[0]
            self.assertEqual(reply["error"]["code"], "io_error", reply)
            self.assertEqual(sorted(self.on_disk()), ids[5:])
            self.assertEqual(sorted(self.d.jobs.jobs), ids[5:], "the failed step was not undone")
        wait_until(lambda: self.call(op="prune").get("removed") == 7, 10, interval=0.05,
                   message="a prune once the disk works")
        self.assertEqual(self.on_disk(), {})


class WithoutTest(unittest.TestCase):

    def test_without_removes_exactly_those_ids(self):
        import random
        rng = random.Random(5)
        for _ in range(2000):
            ids = sorted(rng.sample(range(1, 500), rng.randint(0, 300)))
            if ids and rng.random() < 0.5:
                at = rng.randrange(len(ids))
                gone = set(ids[at:at + rng.randint(1, 40)])
            else:
                gone = set(rng.sample(ids, rng.randint(0, len(ids)))) if ids else set()
            self.assertEqual(jr.JobTable._without(list(ids), gone),
                             [i for i in ids if i not in gone])


if __name__ == "__main__":
    unittest.main()
