"""Unit tests for jobrunnerd without a daemon process.

They step the pieces directly, as STYLE.md asks: the retry policy (`next_run_at`), the state
machine (`TRANSITIONS` through `JobTable.transition`), the queue (`JobTable` with an injected
clock), the store (snapshot + journal: generations, torn tails, damage, injected disk errors,
the lock), the event log, the protocol codec (`decode_request`, `validate_add`, `utf8_prefix`),
the config, the handler table against SPEC, and the standard-library-only rule.

No sleeps, no subprocess daemon; each test has its own temporary directory. The whole file runs
in a few seconds.
"""
import ast
import collections
import contextlib
import errno
import fnmatch
import gc
import glob
import io
import json
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
import time
import traceback
import unittest
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jobrunnerd as jr  # noqa: E402
from tests import support  # noqa: E402
from tests.support import in_process_daemon  # noqa: E402

# SPEC §3: the documented ops. Kept here literally so that a new handler needs a SPEC change.
SPEC_OPS = ("hello add add_batch get list cancel retry wait output stats pause resume prune"
            " queues set_workers schedules trigger metrics activity update").split()

TARGET = "examples.jobs:ExampleJob"
TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"     # SPEC §6 time format


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class TempCase(unittest.TestCase):
    """Every test gets its own temporary directory in self.tmp."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="jobrunner-unit-")
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)


def record(job_id: int, **fields) -> dict:
    """A complete stored job record, as the store keeps it."""
    rec = {"id": job_id, "target": TARGET, "method": None, "args": ["a", job_id],
           "kwargs": {}, "priority": 0, "state": "pending", "attempts": 0, "retries": 0,
           "retry_delay": 1.0, "backoff": "exponential", "timeout": 3600.0, "key": None,
           "created_at": 100.0, "run_at": 100.0}
    rec.update(fields)
    return jr.Job.from_stored(rec).stored()


def retry_job(attempts, retries=5, retry_delay=2.0, backoff="exponential") -> jr.Job:
    return jr.Job(id=1, target=TARGET, state=jr.RUNNING, attempts=attempts, retries=retries,
                  retry_delay=retry_delay, backoff=backoff, priority=0)


####################################################################################################
#  Retry policy
####################################################################################################

class RetryPolicyTest(unittest.TestCase):
    NOW = 1000.0

    def test_fixed_delay_is_the_same_for_every_retry(self):
        for k in range(1, 6):
            with self.subTest(k=k):
                job = retry_job(k, retries=5, retry_delay=2.5, backoff="fixed")
                self.assertEqual(jr.next_run_at(job, self.NOW, 3600.0), self.NOW + 2.5)

    def test_exponential_delay_doubles_per_retry(self):
        for k in range(1, 6):
            with self.subTest(k=k):
                job = retry_job(k, retries=5, retry_delay=2.0)
                self.assertEqual(jr.next_run_at(job, self.NOW, 3600.0),
                                 self.NOW + 2.0 * 2 ** (k - 1))

    def test_delay_is_capped_by_max_retry_delay(self):
        for k in range(1, 6):
            for backoff in ("fixed", "exponential"):
                with self.subTest(k=k, backoff=backoff):
                    job = retry_job(k, retries=5, retry_delay=10.0, backoff=backoff)
                    uncapped = 10.0 if backoff == "fixed" else 10.0 * 2 ** (k - 1)
                    self.assertEqual(jr.next_run_at(job, self.NOW, 30.0),
                                     self.NOW + min(uncapped, 30.0))

    def test_no_retry_left_gives_none(self):
        # `retries` retries after the first attempt: at most retries + 1 attempts.
        self.assertIsNone(jr.next_run_at(retry_job(1, retries=0), self.NOW, 3600.0))
        self.assertIsNone(jr.next_run_at(retry_job(4, retries=3), self.NOW, 3600.0))
        self.assertIsNone(jr.next_run_at(retry_job(1001, retries=1000), self.NOW, 3600.0))
        self.assertIsNotNone(jr.next_run_at(retry_job(3, retries=3), self.NOW, 3600.0))
        self.assertIsNotNone(jr.next_run_at(retry_job(1, retries=1), self.NOW, 3600.0))

    def test_huge_retry_number_does_not_overflow(self):
        for k in (64, 65, 1000, 10 ** 6, 10 ** 18):
            with self.subTest(k=k):
                job = retry_job(k, retries=10 ** 19, retry_delay=jr.MAX_DELAY)
                self.assertEqual(jr.next_run_at(job, self.NOW, 3600.0), self.NOW + 3600.0)
                zero = retry_job(k, retries=10 ** 19, retry_delay=0.0)
                self.assertEqual(jr.next_run_at(zero, self.NOW, 3600.0), self.NOW)


####################################################################################################
#  JobTable: transitions, queue order, indexes, undo
####################################################################################################

class TableCase(TempCase):
    def setUp(self):
        super().setUp()
        self.clock = Clock()

    def make_table(self, name="t") -> jr.JobTable:
        state, logs = self.path(name, "state"), self.path(name, "logs")
        os.makedirs(state)
        os.makedirs(logs)
        store = jr.Store(state, fsync=False)
        self.addCleanup(store.close)
        meta, records = store.load()
        log = jr.EventLog(logs, clock=self.clock)
        self.addCleanup(log.close)
        table = jr.JobTable(store, log, clock=self.clock)
        table.load(meta, records)
        return table

    def add(self, table, delay=0.0, **fields) -> jr.Job:
        now = self.clock()
        values = dict(target=TARGET, method=None, args=[], kwargs={}, priority=0,
                      run_at=now + delay, retries=0, retry_delay=1.0, backoff="exponential",
                      timeout=None, key=None, uid=0)
        values.update(fields)
        return table.create(now, [values])[0]

    def start(self, table, job):
        table.transition(job, jr.RUNNING, changes={"attempts": job.attempts + 1})

    def walk_to(self, table, job, state):
        """Take a new pending job to `state` by legal moves."""
        if state == jr.PENDING:
            return
        if state == jr.BLOCKED:             # (a blocked job needs no parent for these moves)
            table.transition(job, jr.CANCELLED)
            table.transition(job, jr.BLOCKED)
            return
        if state == jr.CANCELLED:
            table.transition(job, jr.CANCELLED)
            return
        self.start(table, job)
        if state in (jr.SUCCEEDED, jr.FAILED):
            table.transition(job, state)

    def drain(self, table, now=None) -> list[int]:
        now = self.clock() if now is None else now
        out = []
        while True:
            job = table.pop_due(now)
            if job is None:
                return out
            out.append(job.id)

    def assert_consistent(self, table):
        self.assertEqual(table.counts,
                         {s: sum(1 for j in table.jobs.values() if j.state == s)
                          for s in jr.STATES})
        self.assertEqual(table.ids, sorted(table.jobs))
        self.assertEqual(table.keys, {j.key: j.id for j in table.jobs.values()
                                      if j.key is not None and j.state in jr.LIVE})
        self.assertEqual(table.by_state, {s: {j.id for j in table.jobs.values() if j.state == s}
                                          for s in jr.STATES})
        if table.by_target is not None:
            expected = collections.defaultdict(list)
            for job_id in table.ids:
                expected[table.jobs[job_id].target].append(job_id)
            self.assertEqual(table.by_target, dict(expected))


class TransitionTest(TableCase):
    def test_every_legal_move_logs_its_event_and_journals_once(self):
        table = self.make_table()
        for (old, new), events in jr.TRANSITIONS.items():
            if old is None:
                continue
            for event in (None,) + events:
                with self.subTest(move=(old, new), event=event):
                    job = self.add(table)
                    self.walk_to(table, job, old)
                    self.assertEqual(job.state, old)
                    lines, logged = len(table.store.lines), len(table.log.buffers["events"])
                    self.clock.advance(1)
                    if event is None:
                        table.transition(job, new)
                    else:
                        table.transition(job, new, event=event)
                    self.assertEqual(job.state, new)
                    self.assertEqual(len(table.store.lines), lines + 1)
                    self.assertEqual(json.loads(table.store.lines[-1]), {"job": job.stored()})
                    self.assertEqual(len(table.log.buffers["events"]), logged + 1)
                    line = table.log.buffers["events"][-1]
                    self.assertRegex(line, r"^%s event=%s job=%d target=%s[ \n]"
                                     % (TS, event or events[0], job.id, re.escape(TARGET)))
                    if new in jr.FINISHED:
                        self.assertEqual(job.finished_at, self.clock())
                    if new == jr.RUNNING:
                        self.assertEqual(job.started_at, self.clock())
                        self.assertIn(" attempt=%d/%d" % (job.attempts, job.retries + 1), line)
                    self.assert_consistent(table)

    def test_create_is_the_move_from_nothing_to_pending(self):
        table = self.make_table()
        job = self.add(table, priority=3)
        self.assertEqual(job.state, jr.PENDING)
        self.assertEqual(len(table.store.lines), 1)
        self.assertEqual(json.loads(table.store.lines[0]), {"jobs": [job.stored()]})
        self.assertEqual(len(table.log.buffers["events"]), 1)
        self.assertRegex(table.log.buffers["events"][0],
                         r"^%s event=queued job=1 target=%s " % (TS, re.escape(TARGET)))

    def test_create_many_writes_one_entry_and_the_generic_queued_lines(self):
        table = self.make_table()
        now = self.clock()
        batch = [dict(target=t, method=None, args=[i], kwargs={}, priority=p, run_at=now + d,
                      retries=0, retry_delay=1.0, backoff="fixed", timeout=None, key=None, uid=u)
                 for i, (t, p, d, u) in enumerate([(TARGET, 0, 0, 0), ("a.b:C", -5, 2.5, None),
                                                   ('x:Y', 7, 0, 1000)])]
        jobs = table.create(now, batch)
        self.assertEqual([job.id for job in jobs], [1, 2, 3])
        self.assertEqual(len(table.store.lines), 1)
        line = table.store.lines[0]
        self.assertEqual(json.loads(line), {"jobs": [job.stored() for job in jobs]})
        self.assertEqual(line.count(jr.RECORD_SEP), 2)      # the fold cuts records there
        expected = [jr.format_event(now, "queued", {"job": job.id, "target": job.target,
                                                    "uid": job.uid, "priority": job.priority,
                                                    "run_at": job.run_at}) for job in jobs]
        self.assertEqual(table.log.buffers["events"], expected)
        self.assert_consistent(table)

    def test_announced_events_match_the_spec_names(self):
        expected = {
            (None, "pending"): {"queued"}, ("pending", "running"): {"started"},
            ("running", "succeeded"): {"succeeded"},
            ("running", "pending"): {"retrying", "interrupted"},
            ("running", "failed"): {"failed"}, ("pending", "cancelled"): {"cancelled"},
            ("running", "cancelled"): {"cancelled"}, ("failed", "pending"): {"queued"},
            ("cancelled", "pending"): {"queued"},
            (None, "blocked"): {"blocked"}, ("blocked", "pending"): {"unblocked"},
            ("blocked", "cancelled"): {"cancelled"}, ("failed", "blocked"): {"blocked"},
            ("cancelled", "blocked"): {"blocked"},
        }
        self.assertEqual({move: set(events) for move, events in jr.TRANSITIONS.items()},
                         expected)

    def test_every_illegal_move_raises_and_changes_nothing(self):
        table = self.make_table()
        illegal = [(a, b) for a in jr.STATES for b in jr.STATES if (a, b) not in jr.TRANSITIONS]
        self.assertIn(("succeeded", "running"), illegal)
        self.assertIn(("pending", "succeeded"), illegal)
        for old, new in illegal:
            with self.subTest(move=(old, new)):
                job = self.add(table)
                self.walk_to(table, job, old)
                before = job.stored()
                lines, logged = len(table.store.lines), len(table.log.buffers["events"])
                with self.assertRaises(AssertionError):
                    table.transition(job, new)
                self.assertEqual(job.stored(), before)
                self.assertEqual(len(table.store.lines), lines)
                self.assertEqual(len(table.log.buffers["events"]), logged)
                self.assert_consistent(table)

    def test_an_event_that_does_not_fit_the_move_is_refused(self):
        table = self.make_table()
        job = self.add(table)
        with self.assertRaises(AssertionError):
            table.transition(job, jr.RUNNING, event="succeeded")
        self.start(table, job)
        with self.assertRaises(AssertionError):
            table.transition(job, jr.PENDING, event="queued")
        self.assertEqual(job.state, jr.RUNNING)

    def test_failure_detail_goes_to_the_errors_log(self):
        table = self.make_table()
        job = self.add(table)
        self.start(table, job)
        table.transition(job, jr.FAILED, detail="Traceback (most recent call last):\n  boom",
                         changes={"error": "boom"})
        errors = table.log.buffers["errors"]
        self.assertEqual(len(errors), 1)
        head, *rest = errors[0].splitlines()
        self.assertRegex(head, r"^%s event=failed job=1 " % TS)
        self.assertEqual(rest, ["    Traceback (most recent call last):", "      boom"])

    def test_only_transition_assigns_job_state(self):
        with open(os.path.join(ROOT, "jobrunnerd.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        writers = []
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                targets = []
                if isinstance(node, ast.Assign):
                    targets = node.targets
                elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                    targets = [node.target]
                for t in targets:
                    for sub in ast.walk(t):         # also inside tuple unpacking
                        if isinstance(sub, ast.Attribute) and sub.attr == "state" \
                                and sub in self._stores(t):
                            writers.append(func.name)
        # Job.__init__ sets the value a job is built with (from its stored record): that is
        # construction, not a move. JobTable.create makes the one move from nothing to pending
        # (for a whole batch at once, checked against TRANSITIONS); every other move goes
        # through transition(), or for the children a parent's end settles, its bulk form
        # _settle_many() (blocked -> pending or cancelled, checked against TRANSITIONS), and
        # those of `cancel`/`retry` with `where`: cancel_many() and retry_many() (issue #16).
        self.assertEqual(set(writers) - {"__init__"}, {"transition", "create", "_settle_many",
                                                       "cancel_many", "retry_many"})

    @staticmethod
    def _stores(target):
        """The nodes a target expression assigns to (not those it merely reads)."""
        if isinstance(target, (ast.Tuple, ast.List)):
            return [n for elt in target.elts for n in TransitionTest._stores(elt)]
        if isinstance(target, ast.Starred):
            return TransitionTest._stores(target.value)
        return [target]


class QueueTest(TableCase):
    def test_select_by_a_rare_state_matches_a_full_scan(self):
        table = self.make_table()
        jobs = [self.add(table) for _ in range(200)]
        for job in jobs[5:200:17]:
            table.transition(job, jr.CANCELLED)
        self.assert_consistent(table)
        cancelled = [j.id for j in jobs if j.state == jr.CANCELLED]
        self.assertLess(len(cancelled) * 8, len(jobs), "the rare-state path is taken")
        for after in (0, cancelled[0], cancelled[3] - 1, 10_000):
            for limit in (1, 3, 1000):
                got = [j.id for j in table.select(jr.CANCELLED, None, after, limit)]
                self.assertEqual(got, [i for i in cancelled if i > after][:limit])
        pending = [j.id for j in table.select(jr.PENDING, None, 0, 1000)]
        self.assertEqual(pending, [j.id for j in jobs if j.state == jr.PENDING])

    def test_higher_priority_first_fifo_among_equals(self):
        table = self.make_table()
        priorities = [0, 5, -3, 5, 10, 0, 5]
        jobs = []
        for p in priorities:
            jobs.append(self.add(table, priority=p))
            self.clock.advance(1)
        # Same clock value for a batch: ties go by id.
        batch = [self.add(table, priority=5) for _ in range(3)]
        expected = [j.id for j in sorted(jobs + batch, key=lambda j: (-j.priority, j.id))]
        self.assertEqual(self.drain(table), expected)
        self.assertIsNone(table.pop_due(self.clock()))
        self.assert_consistent(table)

    def test_delayed_job_waits_for_run_at(self):
        table = self.make_table()
        late = self.add(table, delay=10.0, priority=100)
        self.assertFalse(table.has_due(self.clock()))
        self.assertEqual(table.next_run_at(), late.run_at)
        self.assertIsNone(table.pop_due(self.clock()))
        self.assertIsNone(table.pop_due(late.run_at - 0.001))
        now_job = self.add(table, priority=0)
        self.assertEqual(self.drain(table), [now_job.id])
        self.clock.advance(10.0)
        other = self.add(table, priority=1)
        self.assertTrue(table.has_due(self.clock()))
        # Once due, the delayed job competes by priority like any other.
        self.assertEqual(self.drain(table), [late.id, other.id])
        self.assertIsNone(table.next_run_at())

    def test_cancelled_jobs_are_never_popped(self):
        table = self.make_table()
        a, b, c = self.add(table), self.add(table, priority=9), self.add(table)
        d = self.add(table, delay=5.0, priority=9)
        table.transition(b, jr.CANCELLED)
        table.transition(d, jr.CANCELLED)
        self.clock.advance(10)
        self.assertEqual(self.drain(table), [a.id, c.id])
        self.assertFalse(table.has_due(self.clock()))
        self.assertIsNone(table.next_run_at())
        # Put back with retry: popped exactly once, the stale entries stay dead.
        table.transition(b, jr.PENDING, changes={"run_at": self.clock()})
        table.transition(d, jr.PENDING, changes={"run_at": self.clock() + 5})
        self.assertEqual(self.drain(table), [b.id])
        self.clock.advance(5)
        self.assertEqual(self.drain(table), [d.id])
        self.assertEqual(self.drain(table, now=self.clock() + 10 ** 6), [])

    def test_a_popped_job_is_not_popped_again(self):
        table = self.make_table()
        job = self.add(table)
        self.assertIs(table.pop_due(self.clock()), job)
        self.assertIsNone(table.pop_due(self.clock()))
        # Its attempt fails with a retry later: it comes back once, when due.
        self.start(table, job)
        table.transition(job, jr.PENDING, event="retrying",
                         changes={"run_at": self.clock() + 3})
        self.assertIsNone(table.pop_due(self.clock()))
        self.clock.advance(3)
        self.assertEqual(self.drain(table), [job.id])

    def test_counts_follow_every_move(self):
        table = self.make_table()
        jobs = [self.add(table) for _ in range(6)]
        self.assertEqual(table.counts[jr.PENDING], 6)
        self.start(table, jobs[0])
        self.start(table, jobs[1])
        table.transition(jobs[1], jr.SUCCEEDED)
        self.start(table, jobs[2])
        table.transition(jobs[2], jr.FAILED)
        table.transition(jobs[3], jr.CANCELLED)
        self.assertEqual(table.counts, {"blocked": 0, "pending": 2, "running": 1, "succeeded": 1,
                                        "failed": 1, "cancelled": 1})
        table.transition(jobs[2], jr.PENDING)
        table.remove([jobs[1]])
        self.assertEqual(table.counts, {"blocked": 0, "pending": 3, "running": 1, "succeeded": 0,
                                        "failed": 0, "cancelled": 1})
        self.assert_consistent(table)

    def test_keys_index_live_jobs_only(self):
        table = self.make_table()
        a = self.add(table, key="k")
        self.assertEqual(table.keys, {"k": a.id})
        table.transition(a, jr.CANCELLED)
        self.assertEqual(table.keys, {})
        b = self.add(table, key="k")
        self.assertEqual(table.keys, {"k": b.id})
        self.start(table, b)
        self.assertEqual(table.keys, {"k": b.id})
        table.transition(b, jr.SUCCEEDED)
        self.assertEqual(table.keys, {})
        c = self.add(table, key="other")
        self.start(table, c)
        table.transition(c, jr.FAILED)
        self.assertEqual(table.keys, {})
        table.transition(c, jr.PENDING)          # retry: holds its key again
        self.assertEqual(table.keys, {"other": c.id})
        self.assert_consistent(table)

    def test_keys_after_load_point_at_the_live_holder(self):
        table = self.make_table()
        old = self.add(table, key="k")
        table.transition(old, jr.CANCELLED)
        new = self.add(table, key="k")
        table.store.commit()
        fresh = jr.JobTable(table.store, table.log, clock=self.clock)
        store = jr.Store(table.store.dir, fsync=False)
        self.addCleanup(store.close)
        fresh.load(*store.load())
        self.assertEqual(fresh.keys, {"k": new.id})
        self.assertEqual(fresh.counts[jr.CANCELLED], 1)
        self.assert_consistent(fresh)

    def test_select_filters_by_state_pattern_after_id_and_limit(self):
        table = self.make_table()
        jobs = []
        for i in range(10):
            target = "examples.jobs:ExampleJob" if i % 2 else "examples.other:Thing"
            jobs.append(self.add(table, target=target))
        for j in jobs[:3]:
            table.transition(j, jr.CANCELLED)

        def ids(*args):
            return [j.id for j in table.select(*args)]

        self.assertEqual(ids(None, None, 0, 100), list(range(1, 11)))
        self.assertEqual(ids("cancelled", None, 0, 100), [1, 2, 3])
        self.assertEqual(ids("pending", None, 0, 100), list(range(4, 11)))
        self.assertEqual(ids(None, "examples.jobs:*", 0, 100), [2, 4, 6, 8, 10])
        self.assertEqual(ids(None, "*:Thing", 0, 100), [1, 3, 5, 7, 9])
        self.assertEqual(ids(None, "EXAMPLES.*", 0, 100), [])        # fnmatch, case-sensitive
        self.assertEqual(ids("pending", "examples.jobs:*", 0, 100), [4, 6, 8, 10])
        self.assertEqual(ids(None, None, 4, 100), list(range(5, 11)))
        self.assertEqual(ids(None, None, 4, 3), [5, 6, 7])
        self.assertEqual(ids("pending", "*:Thing", 5, 1), [7])
        self.assertEqual(ids(None, None, 10, 100), [])
        self.assertEqual(ids(None, None, 0, 1), [1])

    def test_select_matches_a_full_scan_through_random_changes_and_undo(self):
        # Every path of select() (all ids, a rare state's ids, the matching targets' ids) and
        # the target index it builds on first use, against filtering every job by hand.
        rng = random.Random(7)
        table = self.make_table()
        targets = ["examples.jobs:A", "examples.jobs:B", "examples.other:C", "reports.x:D"]
        patterns = [None, "examples.jobs:*", "*:C", "reports.*", "*", "nomatch.*"]

        def check():
            for _ in range(6):
                state = rng.choice([None, None] + list(jr.STATES))
                pattern, limit = rng.choice(patterns), rng.choice([1, 3, 50, 1000])
                after = rng.choice([0, 0, rng.randrange(0, table.next_id + 2)])
                expected = [i for i in sorted(table.jobs) if i > after
                            and (state is None or table.jobs[i].state == state)
                            and (pattern is None or fnmatch.fnmatchcase(table.jobs[i].target,
                                                                         pattern))][:limit]
                got = [j.id for j in table.select(state, pattern, after, limit)]
                self.assertEqual(got, expected, (state, pattern, after, limit))
            self.assert_consistent(table)

        def change():
            live = list(table.jobs.values())
            roll = rng.random()
            if roll < 0.45 or not live:
                now = self.clock()
                table.create(now, [dict(target=rng.choice(targets), method=None, args=[],
                                        kwargs={}, priority=0, run_at=now, retries=0,
                                        retry_delay=1.0, backoff="exponential", timeout=None,
                                        key=None, uid=0) for _ in range(rng.randint(1, 4))])
                return
            job = rng.choice(live)
            if job.state == jr.PENDING:
                if roll < 0.7:
                    table.transition(job, jr.CANCELLED)
                else:
                    self.start(table, job)
            elif job.state == jr.RUNNING:
                table.transition(job, jr.SUCCEEDED)
            else:
                table.remove([j for j in live if j.state in jr.FINISHED][:rng.randint(1, 5)])

        for step in range(400):
            if rng.random() < 0.2:
                table.track()
                for _ in range(rng.randint(1, 4)):
                    change()
                table.undo()
            else:
                change()
            self.clock.advance(1)
            if step % 5 == 0:
                check()
        self.assertIsNotNone(table.by_target, "the target index was used")
        check()

    def test_finished_before_keeps_busy_jobs_for_later(self):
        table = self.make_table()
        jobs = [self.add(table) for _ in range(3)]
        for j in jobs:
            self.start(table, j)
            table.transition(j, jr.CANCELLED)
        self.clock.advance(1)
        got = table.finished_before(self.clock(), busy={jobs[1].id})
        self.assertEqual([j.id for j in got], [jobs[0].id, jobs[2].id])
        table.remove(got)
        self.assertEqual([j.id for j in table.finished_before(self.clock())], [jobs[1].id],
                         "a busy job is pruned once its processes are gone")
        self.assert_consistent(table)

    def test_finished_before_and_remove(self):
        table = self.make_table()
        jobs = [self.add(table) for _ in range(4)]
        for j in jobs[:3]:
            self.clock.advance(10)
            self.start(table, j)
            table.transition(j, jr.SUCCEEDED if j.id != 2 else jr.FAILED)
        cutoff = jobs[1].finished_at
        old = table.finished_before(cutoff)
        self.assertEqual([j.id for j in old], [1, 2])
        lines = len(table.store.lines)
        table.remove(old)
        self.assertEqual(len(table.store.lines), lines + 1)
        self.assertEqual(json.loads(table.store.lines[-1]), {"del": [1, 2]})
        self.assertEqual(sorted(table.jobs), [3, 4])
        self.assertEqual(table.ids, [3, 4])
        self.assertEqual(table.counts[jr.SUCCEEDED] + table.counts[jr.FAILED], 1)
        self.assertEqual([j.id for j in table.finished_before(self.clock())], [3])
        self.assert_consistent(table)
        with self.assertRaises(AssertionError):     # only finished jobs can be pruned
            table.remove([jobs[3]])

    def test_load_rebuilds_the_same_queue(self):
        table = self.make_table()
        jobs = [self.add(table, priority=p, delay=d)
                for p, d in [(0, 0), (3, 0), (3, 50), (1, 0), (0, 0)]]
        table.transition(jobs[4], jr.CANCELLED)
        table.store.commit()
        store = jr.Store(table.store.dir, fsync=False)
        self.addCleanup(store.close)
        fresh = jr.JobTable(store, table.log, clock=self.clock)
        fresh.load(*store.load())
        self.assertEqual({i: j.stored() for i, j in fresh.jobs.items()},
                         {i: j.stored() for i, j in table.jobs.items()})
        self.assertEqual(fresh.next_id, table.next_id)
        self.assertEqual(self.drain(fresh), [2, 4, 1])
        self.clock.advance(50)
        self.assertEqual(self.drain(fresh), [3])


class UndoTest(TableCase):
    def test_an_undone_retry_never_starts_the_job(self):
        # retry pushes a heap entry; undo must leave the job's token past it, or pop_due would
        # hand out a failed (or cancelled) job that the client was told was not changed.
        for final in (jr.FAILED, jr.CANCELLED):
            with self.subTest(final=final):
                table = self.make_table(final)
                job = self.add(table)
                self.walk_to(table, job, final)
                table.track()
                table.transition(job, jr.PENDING, event="queued")
                table.undo()
                self.assertEqual(job.state, final)
                self.assertIsNone(table.pop_due(self.clock() + 1))
                self.assert_consistent(table)

    def test_undoing_a_big_batch_keeps_the_ids_in_order(self):
        table = self.make_table()
        kept = [self.add(table) for _ in range(3)]
        now = self.clock()
        table.track()
        table.create(now, [dict(target=TARGET, method=None, args=[i], kwargs={}, priority=0,
                                run_at=now, retries=0, retry_delay=1.0, backoff="fixed",
                                timeout=None, key=None, uid=0) for i in range(500)])
        table.transition(kept[1], jr.CANCELLED)
        table.undo()
        self.assertEqual(table.ids, [job.id for job in kept])
        self.assertEqual(kept[1].state, jr.PENDING)
        self.assert_consistent(table)

    def build(self, table):
        """The same starting point for two tables: ready, delayed, running and finished jobs."""
        self.clock.t = 1_000_000.0
        made = {}
        made["p1"] = self.add(table, priority=1)
        made["k2"] = self.add(table, priority=5, key="k2")
        made["late"] = self.add(table, delay=100.0, priority=7)
        made["run"] = self.add(table, key="run")
        self.start(table, made["run"])
        made["done"] = self.add(table)
        self.start(table, made["done"])
        self.clock.advance(1)
        table.transition(made["done"], jr.SUCCEEDED)
        made["gone"] = self.add(table, key="k6")
        table.transition(made["gone"], jr.CANCELLED)
        made["p0"] = self.add(table)
        self.clock.advance(1)
        table.store.commit()
        return made

    @staticmethod
    def state(table):
        return ({i: j.stored() for i, j in table.jobs.items()}, list(table.ids),
                dict(table.counts), dict(table.keys), table.paused)

    def test_undo_restores_everything_changed_since_track(self):
        plain, tracked = self.make_table("a"), self.make_table("b")
        self.build(plain)
        made = self.build(tracked)
        before = self.state(tracked)
        self.assertEqual(before, self.state(plain))
        next_id = tracked.next_id

        tracked.track()
        new = self.add(tracked, priority=9, key="new")
        self.add(tracked, delay=5.0, key="k2b")
        tracked.transition(made["p1"], jr.RUNNING, changes={"attempts": 1})
        tracked.transition(made["k2"], jr.CANCELLED)
        tracked.update(made["run"], pid=4242)
        tracked.transition(made["run"], jr.SUCCEEDED)
        tracked.transition(made["late"], jr.CANCELLED)
        tracked.set_paused(True)
        tracked.remove(tracked.finished_before(self.clock()))
        self.assertNotIn(made["done"].id, tracked.jobs)
        self.assertIn(new.id, tracked.jobs)
        tracked.undo()

        self.assertEqual(self.state(tracked), before)
        self.assertGreaterEqual(tracked.next_id, next_id)     # ids are never reused
        self.assert_consistent(tracked)
        # The heaps answer as if nothing had happened.
        self.assertEqual(tracked.has_due(self.clock()), plain.has_due(self.clock()))
        self.assertEqual(tracked.next_run_at(), plain.next_run_at())
        self.assertEqual(self.drain(tracked), self.drain(plain))
        self.clock.advance(200)
        self.assertEqual(self.drain(tracked), self.drain(plain))
        got = [j.id for j in tracked.finished_before(self.clock())]
        self.assertEqual(got, [j.id for j in plain.finished_before(self.clock())])
        self.assertEqual(len(got), len(set(got)))

    def test_undo_of_set_paused_alone(self):
        table = self.make_table()
        table.track()
        table.set_paused(True)
        table.set_paused(False)
        table.set_paused(True)
        table.undo()
        self.assertFalse(table.paused)

    def test_undone_retry_leaves_one_prunable_entry(self):
        # A `retry` whose journal write fails is undone; a later prune must see the job once.
        table = self.make_table()
        job = self.add(table)
        self.start(table, job)
        table.transition(job, jr.FAILED)
        self.clock.advance(1)
        table.track()
        table.transition(job, jr.PENDING, changes={
            "attempts": 0, "run_at": self.clock(), "started_at": None, "finished_at": None})
        table.undo()
        self.assertEqual(job.state, jr.FAILED)
        found = table.finished_before(self.clock())
        self.assertEqual([j.id for j in found], [job.id])
        table.remove(found)
        self.assertEqual(table.jobs, {})
        self.assert_consistent(table)


####################################################################################################
#  Store
####################################################################################################

class StoreCase(TempCase):
    def setUp(self):
        super().setUp()
        self.state = self.path("state")
        os.makedirs(self.state)
        self.peeks = 0

    def open_store(self, path=None, fsync=True) -> jr.Store:
        store = jr.Store(path or self.state, fsync=fsync)
        self.addCleanup(store.close)
        return store

    def peek(self, path=None):
        """Load a copy of the state dir (load() may repair what it reads; the original stays)."""
        self.peeks += 1
        copy = self.path("peek%d" % self.peeks)
        shutil.copytree(path or self.state, copy)
        store = jr.Store(copy, fsync=False)
        try:
            meta, records = store.load()
        finally:
            store.close()
        return meta, records, store.warnings

    def files(self, path=None):
        path = path or self.state
        out = {}
        for name in sorted(os.listdir(path)):
            with open(os.path.join(path, name), "rb") as f:
                out[name] = f.read()
        return out

    def commit(self, store, *entries):
        for entry in entries:
            store.append(entry)
        store.commit()


class StoredRecordTest(unittest.TestCase):
    """Job.stored() leaves out what from_stored() restores; a job read back equals the job."""

    def test_a_job_read_back_is_the_same_job(self):
        cases = [dict(priority=0, attempts=0, backoff="exponential", retry_delay=10.0,
                      timeout=3600.0, run_at=100.0, args=[], kwargs={}),
                 dict(priority=-3, attempts=2, backoff="fixed", retry_delay=2.5, timeout=None,
                      run_at=160.5, args=[1, "x"], kwargs={"k": [None]}, key="k", pid=7,
                      state="running", started_at=150.0)]
        for fields in cases:
            with self.subTest(fields=fields):
                job = jr.Job(id=5, target=TARGET, method=None, state=fields.pop("state", "pending"),
                             retries=3, created_at=100.0, uid=0, **fields)
                stored = job.stored()
                self.assertNotIn("run_at" if job.run_at == 100.0 else "nothing", stored)
                back = jr.Job.from_stored(json.loads(jr._json_line(stored)))
                self.assertEqual(back.record(), job.record())
                for name in ("retry_delay", "timeout", "created_at", "run_at"):
                    value = getattr(back, name)     # whole seconds are ints on disk only
                    self.assertIn(type(value), (float, type(None)), name)


class StoreBasicsTest(StoreCase):
    def test_fresh_dir_is_empty(self):
        store = self.open_store()
        meta, records = store.load()
        self.assertEqual(meta, {"next_id": 1, "paused": False})
        self.assertEqual(records, {})
        self.assertEqual(store.warnings, [])
        self.assertEqual(self.peek()[:2], (meta, records))

    def test_committed_changes_load_in_a_new_store(self):
        store = self.open_store()
        store.load()
        r1, r2, r3 = record(1), record(2, priority=4), record(3, key="ключ \n")
        self.commit(store, {"job": r1}, {"job": r2})
        r1b = record(1, state="running", attempts=1, pid=99)
        self.commit(store, {"job": r3}, {"job": r1b}, {"paused": True}, {"del": [3]})
        store.append({"job": record(4)})            # appended, never committed
        other = self.open_store()
        meta, records = other.load()
        self.assertEqual(records, {1: r1b, 2: r2})
        # ids are never reused: the removed job 3 still counts.
        self.assertEqual(meta, {"next_id": 4, "paused": True})
        self.assertEqual(other.warnings, [])

    def test_compaction_is_wanted_once_the_journal_outgrows_a_mebibyte_and_the_snapshot(self):
        store = self.open_store()
        store.load()
        pad = "p" * 20_000
        job_id = 0

        def grow_until_wanted():
            nonlocal job_id
            while not store.wants_compaction():
                before = store.size
                job_id += 1
                self.commit(store, {"job": record(job_id, args=[pad])})
            return before, store.size
        before, after = grow_until_wanted()
        self.assertLessEqual(before, jr.JOURNAL_MIN_COMPACT)
        self.assertGreater(after, jr.JOURNAL_MIN_COMPACT)
        # A snapshot bigger than a mebibyte: the journal may grow as big as it before a fold.
        jobs = {i: jr.Job.from_stored(record(i, args=[pad * 2])) for i in range(1, 101)}
        store.snapshot({"next_id": 101, "paused": False}, jobs)
        self.assertGreater(store.snapshot_size, 3 * jr.JOURNAL_MIN_COMPACT)
        self.assertFalse(store.wants_compaction(), "a fresh journal")
        before, after = grow_until_wanted()
        self.assertLessEqual(before, store.snapshot_size)
        self.assertGreater(after, store.snapshot_size)

    def test_discarded_lines_are_not_written(self):
        store = self.open_store()
        store.load()
        store.append({"job": record(1)})
        store.discard()
        store.commit()
        self.commit(store, {"job": record(2)})
        self.assertEqual(set(self.peek()[1]), {2})

    def test_snapshot_then_load(self):
        store = self.open_store()
        store.load()
        self.commit(store, {"job": record(1)}, {"job": record(2)}, {"next_id": 10})
        jobs = [jr.Job.from_stored(record(1, state="succeeded")), jr.Job.from_stored(record(2))]
        store.snapshot({"next_id": 10, "paused": True}, jobs)
        with open(store.journal_path, "rb") as f:
            self.assertEqual(f.read(), b'{"gen":1,"format":2}\n')
        with open(store.snapshot_path, "rb") as f:
            self.assertEqual(json.loads(f.read())["gen"], 1)
        expected = {1: record(1, state="succeeded"), 2: record(2)}
        meta, records, warnings = self.peek()
        self.assertEqual((meta, records, warnings),
                         ({"next_id": 10, "paused": True}, expected, []))
        # The journal continues the snapshot.
        self.commit(store, {"job": record(3)}, {"del": [1]}, {"paused": False})
        del expected[1]
        expected[3] = record(3)
        self.assertEqual(self.peek()[:2], ({"next_id": 10, "paused": False}, expected))
        store.snapshot({"next_id": 10, "paused": False}, [jr.Job.from_stored(r)
                                                          for r in expected.values()])
        self.assertEqual(store.gen, 2)
        self.assertEqual(self.peek()[:2], ({"next_id": 10, "paused": False}, expected))

    def test_group_commit_is_one_write_and_one_fdatasync(self):
        store = self.open_store()
        store.load()
        for i in range(1, 101):
            store.append({"job": record(i)})
        with mock.patch.object(jr.os, "write", wraps=os.write) as write, \
                mock.patch.object(jr.os, "fdatasync", wraps=os.fdatasync) as sync:
            store.commit()
            store.commit()                  # nothing new: no disk work
        self.assertEqual(write.call_count, 1)
        self.assertEqual(sync.call_count, 1)
        self.assertEqual(len(self.peek()[1]), 100)

    def test_fsync_never_skips_fdatasync(self):
        store = self.open_store(fsync=False)
        store.load()
        with mock.patch.object(jr.os, "fdatasync", wraps=os.fdatasync) as sync:
            self.commit(store, {"job": record(1)})
        self.assertEqual(sync.call_count, 0)
        self.assertEqual(set(self.peek()[1]), {1})

    def test_unknown_fields_in_a_stored_job_are_tolerated(self):
        store = self.open_store()
        store.load()
        future = dict(record(1), from_a_newer_version={"x": [1, 2]}, colour="blue")
        self.commit(store, {"job": future})
        store.snapshot({"next_id": 2, "paused": False}, [])
        with open(store.snapshot_path, "rb") as f:
            snap = json.loads(f.read())
        snap["jobs"] = [dict(record(2), shiny=True)]
        snap["next_id"] = 3
        with open(store.snapshot_path, "w") as f:
            json.dump(snap, f)
        self.commit(store, {"job": future})
        store.close()
        fresh = self.open_store()
        meta, records = fresh.load()
        self.assertEqual(set(records), {1, 2})
        clock = Clock()
        os.makedirs(self.path("logs"))
        log = jr.EventLog(self.path("logs"), clock=clock)
        self.addCleanup(log.close)
        table = jr.JobTable(fresh, log, clock=clock)
        table.load(meta, records)
        self.assertEqual(table.jobs[1].stored(), record(1))
        self.assertEqual(table.jobs[2].stored(), record(2))
        self.assertNotIn("colour", table.jobs[1].stored())

    def test_lock_is_exclusive(self):
        first, second = self.open_store(), self.open_store()
        first.lock()
        with self.assertRaises(jr.StateError) as cm:
            second.lock()
        self.assertIn(os.path.join(self.state, "lock"), str(cm.exception))
        first.close()
        second.lock()                       # free again once the holder is gone


class StoreGenerationTest(StoreCase):
    def test_crash_between_snapshot_and_new_journal(self):
        store = self.open_store()
        store.load()
        self.commit(store, {"job": record(1)}, {"job": record(2)}, {"job": record(3)})
        self.commit(store, {"job": record(1, state="running", attempts=1)})
        # Newer state, never journalled (e.g. folded in at a graceful stop): job 1 done, job 2
        # pruned, job 4 new, paused.
        newer = {1: record(1, state="succeeded", attempts=1), 3: record(3), 4: record(4)}
        meta = {"next_id": 5, "paused": True}
        store.append({"job": record(1, state="running", attempts=1, pid=7)})
        with mock.patch.object(jr.Store, "_new_journal",
                               side_effect=OSError(errno.EIO, "injected crash")):
            with self.assertRaises(OSError):
                store.snapshot(meta, [jr.Job.from_stored(r) for r in newer.values()])
        store.close()                       # the "crash": step 2 never happened
        with open(store.journal_path, "rb") as f:
            self.assertEqual(json.loads(f.readline()), {"gen": 0, "format": 2})   # the old journal is left

        restarted = self.open_store()
        got_meta, records = restarted.load()
        self.assertEqual((got_meta, records), (meta, newer))
        self.assertEqual(restarted.warnings, [])
        # Work goes on after the restart; nothing of the old journal comes back.
        self.commit(restarted, {"job": record(5)}, {"del": [3]})
        newer[5] = record(5)
        del newer[3]
        restarted.close()
        again = self.open_store()
        self.assertEqual(again.load(), ({"next_id": 6, "paused": True}, newer))
        self.assertEqual(again.warnings, [])

    def test_journal_newer_than_snapshot_is_refused(self):
        store = self.open_store()
        store.load()
        self.commit(store, {"job": record(1)})
        store.snapshot({"next_id": 2, "paused": False}, [jr.Job.from_stored(record(1))])
        self.commit(store, {"job": record(2)})
        store.close()
        os.unlink(store.snapshot_path)      # the snapshot is lost: the journal alone is not all
        before = self.files()
        with self.assertRaises(jr.StateError) as cm:
            self.open_store().load()
        self.assertIn(store.journal_path, str(cm.exception))
        self.assertRegex(str(cm.exception), r"offset \d+")
        self.assertEqual(self.files(), before)


class StoreTornTailTest(StoreCase):
    def build_journal(self):
        """A journal of header + three records; return (its bytes, start of the last line)."""
        store = self.open_store(fsync=False)
        store.load()
        self.commit(store, {"job": record(1)})
        self.commit(store, {"job": record(2, key="é ✓ 😀")})
        self.commit(store, {"job": record(3, args=["ü" * 3, "✓", "😀", {"n": None}],
                                          key="last")})
        store.close()
        with open(store.journal_path, "rb") as f:
            data = f.read()
        start = data.rindex(b"\n", 0, len(data) - 1) + 1
        return store.journal_path, data, start

    def test_torn_last_record_at_every_byte_offset(self):
        path, data, start = self.build_journal()
        for length in range(start, len(data) + 1):
            with self.subTest(length=length):
                with open(path, "wb") as f:
                    f.write(data[:length])
                store = jr.Store(self.state, fsync=False)
                try:
                    meta, records = store.load()
                    kept = 3 in records
                    if length == len(data):
                        self.assertTrue(kept)
                    elif length < len(data) - 1:
                        self.assertFalse(kept)
                    # (the record without its newline may be kept or dropped, consistently)
                    self.assertEqual(records[1], record(1))
                    self.assertEqual(records[2], record(2, key="é ✓ 😀"))
                    if kept:
                        self.assertEqual(records[3], record(3, args=["üüü", "✓", "😀",
                                                                     {"n": None}], key="last"))
                    if start < length < len(data) and not kept:
                        self.assertTrue(store.warnings, "a torn tail must be warned about")
                        self.assertIn(path, store.warnings[0])
                        self.assertIn("offset %d " % start, store.warnings[0])
                    if length in (start, len(data)):
                        self.assertEqual(store.warnings, [])
                    # New appends land on a clean line.
                    self.commit(store, {"job": record(9)}, {"paused": True})
                finally:
                    store.close()
                again = jr.Store(self.state, fsync=False)
                try:
                    meta, records = again.load()
                finally:
                    again.close()
                self.assertEqual(again.warnings, [])
                self.assertEqual(set(records), {1, 2, 9} | ({3} if kept else set()))
                self.assertEqual(meta, {"next_id": 10, "paused": True})
                with open(path, "rb") as f:
                    for line in f.read().split(b"\n")[:-1]:
                        json.loads(line)

    def test_zero_filled_tail_is_dropped(self):
        path, data, start = self.build_journal()
        for name, damaged, expect in [("after the last line", data + b"\0" * 100, {1, 2, 3}),
                                      ("over the last line", data[:start] + b"\0" * 100, {1, 2}),
                                      ("zeros then newline", data[:start] + b"\0" * 20 + b"\n",
                                       {1, 2})]:
            with self.subTest(name):
                with open(path, "wb") as f:
                    f.write(damaged)
                store = jr.Store(self.state, fsync=False)
                try:
                    meta, records = store.load()
                    self.assertEqual(set(records), expect)
                    self.assertTrue(store.warnings)
                    offset = len(data) if expect == {1, 2, 3} else start
                    self.assertIn("offset %d " % offset, store.warnings[0])
                    self.commit(store, {"job": record(7)})
                finally:
                    store.close()
                self.assertEqual(set(self.peek()[1]), expect | {7})
                self.assertEqual(self.peek()[2], [])

    def test_unparseable_complete_last_line_is_dropped(self):
        path, data, start = self.build_journal()
        with open(path, "wb") as f:
            f.write(data[:start] + b'{"job": {"id": 3, "tar\xffget\n')
        store = self.open_store(fsync=False)
        _, records = store.load()
        self.assertEqual(set(records), {1, 2})
        self.assertTrue(store.warnings)


class StoreDamageTest(StoreCase):
    def build(self):
        store = self.open_store()
        store.load()
        self.commit(store, {"job": record(1, key="ключ")}, {"job": record(2)})
        store.snapshot({"next_id": 3, "paused": False},
                       [jr.Job.from_stored(record(1, key="ключ")),
                        jr.Job.from_stored(record(2))])
        self.commit(store, {"job": record(3)})
        self.commit(store, {"job": record(4)})
        self.commit(store, {"job": record(5)})
        store.close()
        return store

    def assert_refused(self, path, offset=None):
        before = self.files()
        with self.assertRaises(jr.StateError) as cm:
            self.open_store().load()
        message = str(cm.exception)
        self.assertIn(path, message)
        self.assertRegex(message, r"offset \d+")
        if offset is not None:
            self.assertRegex(message, r"offset %d\b" % offset)
        self.assertEqual(self.files(), before, "the damaged state must not be touched")
        return message

    def test_garbage_snapshot(self):
        store = self.build()
        with open(store.snapshot_path, "wb") as f:
            f.write(b"this is not json")
        self.assert_refused(store.snapshot_path, 0)

    def test_garbage_inside_the_snapshot_names_the_byte_offset(self):
        store = self.build()
        with open(store.snapshot_path, "rb") as f:
            good = f.read()
        cut = good.index(b"},\n", good.index("ключ".encode())) + 3    # after job 1's record
        with open(store.snapshot_path, "wb") as f:
            f.write(good[:cut] + b"@@@" + good[cut:])
        self.assert_refused(store.snapshot_path, cut)

    def test_snapshot_that_is_not_utf8(self):
        store = self.build()
        with open(store.snapshot_path, "rb") as f:
            good = f.read()
        at = good.index("ключ".encode())
        with open(store.snapshot_path, "wb") as f:
            f.write(good[:at] + b"\xff" + good[at + 1:])
        self.assert_refused(store.snapshot_path, at)

    def test_empty_snapshot(self):
        store = self.build()
        for content in (b"", b"\n  \n"):
            with self.subTest(content=content):
                with open(store.snapshot_path, "wb") as f:
                    f.write(content)
                self.assert_refused(store.snapshot_path, 0)

    def test_snapshot_of_the_wrong_shape(self):
        store = self.build()
        for content in (b"[]", b'{"jobs": 5}', b"42"):
            with self.subTest(content=content):
                with open(store.snapshot_path, "wb") as f:
                    f.write(content)
                self.assert_refused(store.snapshot_path)

    def test_bad_line_in_the_middle_of_the_journal(self):
        store = self.build()
        with open(store.journal_path, "rb") as f:
            lines = f.read().split(b"\n")
        self.assertEqual(len(lines), 5)         # header, three records, "" after the last \n
        for bad in (b'{"job": {"id": 4', b"\xff\xfe", b"[1, 2]", b'{"job": 5}',
                    b'{"nonsense": 1}', b""):
            with self.subTest(bad=bad):
                damaged = lines[:2] + [bad] + lines[3:]
                with open(store.journal_path, "wb") as f:
                    f.write(b"\n".join(damaged))
                offset = len(lines[0]) + len(lines[1]) + 2
                self.assert_refused(store.journal_path, offset)

    def test_journal_without_a_generation_header(self):
        store = self.build()
        with open(store.journal_path, "rb") as f:
            lines = f.read().split(b"\n")
        with open(store.journal_path, "wb") as f:
            f.write(b"\n".join(lines[1:]))
        self.assert_refused(store.journal_path, 0)


class StoreDiskErrorTest(StoreCase):
    """Injected ENOSPC / EIO: a commit fails as a whole, the disk keeps the last good state."""

    def expect_state(self, meta, records):
        got_meta, got_records, warnings = self.peek()
        self.assertEqual(got_records, records)
        self.assertEqual(got_meta, meta)
        self.assertEqual(warnings, [])

    def check_repair(self, store, records):
        self.assertIsNotNone(store.broken)
        store.append({"job": record(50)})
        with self.assertRaises(OSError):        # a broken store refuses until repaired
            store.commit()
        self.expect_state({"next_id": max(records, default=0) + 1, "paused": False}, records)
        store.snapshot({"next_id": 60, "paused": False},
                       [jr.Job.from_stored(r) for r in records.values()])
        self.assertIsNone(store.broken)
        self.commit(store, {"job": record(60)})
        self.expect_state({"next_id": 61, "paused": False}, {**records, 60: record(60)})

    def test_write_fails_partway(self):
        real_write = os.write
        for err in (errno.ENOSPC, errno.EIO):
            for n in (1, 2, 3, 5, 10, 40):
                with self.subTest(errno=errno.errorcode[err], call=n):
                    state = self.path("w-%d-%d" % (err, n))
                    os.makedirs(state)
                    self.state = state
                    store = self.open_store(state)
                    store.load()
                    self.commit(store, {"job": record(1)}, {"job": record(2)})
                    calls = [0]

                    def short_write(fd, data):
                        calls[0] += 1
                        if calls[0] == n:
                            raise OSError(err, os.strerror(err))
                        return real_write(fd, bytes(data[:7]))    # short writes, several calls

                    for i in (3, 4, 5):
                        store.append({"job": record(i, args=["x" * 50])})
                    with mock.patch.object(jr.os, "write", short_write):
                        with self.assertRaises(OSError) as cm:
                            store.commit()
                    self.assertEqual(cm.exception.errno, err)
                    self.expect_state({"next_id": 3, "paused": False},
                                      {1: record(1), 2: record(2)})
                    self.check_repair(store, {1: record(1), 2: record(2)})

    def test_fdatasync_fails_on_call_n(self):
        real_sync = os.fdatasync
        for err in (errno.ENOSPC, errno.EIO):
            for n in range(1, 5):
                with self.subTest(errno=errno.errorcode[err], call=n):
                    state = self.path("s-%d-%d" % (err, n))
                    os.makedirs(state)
                    self.state = state
                    store = self.open_store(state)
                    store.load()
                    calls = [0]

                    def sync(fd):
                        calls[0] += 1
                        if calls[0] == n:
                            raise OSError(err, os.strerror(err))
                        return real_sync(fd)

                    committed = {}
                    with mock.patch.object(jr.os, "fdatasync", side_effect=sync):
                        for i in range(1, n + 1):
                            store.append({"job": record(i)})
                            store.append({"paused": False})
                            if i < n:
                                store.commit()
                                committed[i] = record(i)
                            else:
                                with self.assertRaises(OSError) as cm:
                                    store.commit()
                    self.assertEqual(cm.exception.errno, err)
                    self.expect_state({"next_id": n, "paused": False}, committed)
                    self.check_repair(store, committed)

    def test_failed_snapshot_never_loses_a_later_commit(self):
        # snapshot() may fail at any of its fsyncs (snapshot file, directory, new journal,
        # directory). Its docstring: "raises OSError (store left as it was, or broken)". Either
        # way a commit after it must fail loudly or be durable: never "ok" and then lost.
        real_fsync = os.fsync
        for n in range(1, 5):
            with self.subTest(fsync_call=n):
                state = self.path("snap-%d" % n)
                os.makedirs(state)
                self.state = state
                store = self.open_store(state)
                store.load()
                self.commit(store, {"job": record(1)})
                calls = [0]

                def fsync(fd):
                    calls[0] += 1
                    if calls[0] == n:
                        raise OSError(errno.EIO, "injected EIO")
                    return real_fsync(fd)

                with mock.patch.object(jr.os, "fsync", side_effect=fsync):
                    with self.assertRaises(OSError):
                        store.snapshot({"next_id": 2, "paused": False},
                                       [jr.Job.from_stored(record(1))])
                self.assertEqual(self.peek()[1], {1: record(1)})
                store.append({"job": record(2)})
                try:
                    store.commit()
                except OSError:
                    durable = {1: record(1)}
                except Exception as exc:        # pragma: no cover - reported as a failure
                    self.fail("commit after a failed snapshot raised %r, not OSError" % exc)
                else:
                    durable = {1: record(1), 2: record(2)}
                self.assertEqual(self.peek()[1], durable,
                                 "a commit that returned must be on disk after a restart")


####################################################################################################
#  Event log
####################################################################################################

NASTY = ["a b", 'say "hi"', "two\nlines", "cr\rlf\r\n", "tab\there", "bell\x07", "\x00nul",
         "\x1b[31mred", "ls\u2028ps\u2029", "nel\x85", "fs\x1cgs\x1drs\x1e", "vt\x0bff\x0c",
         "del\x7f", "c1\x80\x9f", "back\\slash", "", "a=b", "ünï cödé", "'single'"]


class EventLogTest(TempCase):
    def test_plain_values_are_bare(self):
        for value, text in [("abc", "abc"), (TARGET, TARGET), ("1/3", "1/3"), (7, "7"),
                            (-2, "-2"), (True, "true"), (False, "false"), (1.5, "1.500"),
                            ("/tmp/x.sock", "/tmp/x.sock"), ("a-b_c.d@e+f,g%h", "a-b_c.d@e+f,g%h")]:
            with self.subTest(value=value):
                self.assertEqual(jr.log_value(value), text)

    def test_other_values_are_quoted_escaped_and_stay_on_one_line(self):
        for value in NASTY:
            with self.subTest(value=value):
                text = jr.log_value(value)
                self.assertTrue(text.startswith('"') and text.endswith('"'), text)
                self.assertEqual(len(text.splitlines()), 1)
                self.assertEqual(text.count('"') - text.count('\\"'), 2)
                self.assertEqual(ast.literal_eval(text), value)      # unambiguous
                line = jr.format_event(1.0, "queued", {"job": 1, "target": value, "key": value})
                self.assertEqual(line.count("\n"), 1)
                self.assertTrue(line.endswith("\n"))
                self.assertEqual(len(line.splitlines()), 1)
                self.assertEqual(line.splitlines()[0], line[:-1])
                self.assertFalse(any(ord(c) < 0x20 for c in line[:-1]))

    def test_structured_values_are_quoted(self):
        text = jr.log_value({"a": [1, "b c"]})
        self.assertEqual(ast.literal_eval(text), '{"a": [1, "b c"]}')

    def test_long_values_are_capped(self):
        for value in ("x" * 100_000, "\n" * 100_000, "\u2028" * 100_000, ["y" * 10] * 10_000):
            with self.subTest(kind=repr(value[0])[:10]):
                text = jr.log_value(value)
                self.assertLess(len(text), 6 * jr.MAX_LOG_VALUE + 100)
                self.assertEqual(len(text.splitlines()), 1)

    def test_time_format(self):
        self.assertEqual(jr.log_time(0), "1970-01-01T00:00:00.000Z")
        self.assertEqual(jr.log_time(1764345600.25), "2025-11-28T16:00:00.250Z")
        self.assertEqual(jr.log_time(1764345659.5), "2025-11-28T16:00:59.500Z")
        for t in (1.0, 1e9 + 0.999, 4102444799.875):
            self.assertRegex(jr.log_time(t), "^%s$" % TS)

    def test_event_lines_on_disk(self):
        clock = Clock(1764345600.5)
        log = jr.EventLog(self.tmp, clock=clock)
        self.addCleanup(log.close)
        log.event("queued", job=1, target="a b\nc", attempt=None, priority=5)
        log.event("startup", pid=42)
        log.event("odd", key="\ud800")         # a lone surrogate must not stop the log
        log.flush()
        with open(self.path("background_jobs.log"), encoding="utf-8") as f:
            text = f.read()
        lines = text.split("\n")
        self.assertEqual(lines[:2], [
            '2025-11-28T16:00:00.500Z event=queued job=1 target="a b\\nc" priority=5',
            "2025-11-28T16:00:00.500Z event=startup pid=42"])
        self.assertRegex(lines[2], r'^2025-11-28T16:00:00.500Z event=odd key="[^"]+"$')
        self.assertEqual(lines[3:], [""])

    def test_error_header_then_one_indented_line_per_traceback_line(self):
        try:
            raise ValueError("bad thing")
        except ValueError:
            detail = traceback.format_exc()
        clock = Clock(1764345600.0)
        log = jr.EventLog(self.tmp, clock=clock)
        self.addCleanup(log.close)
        log.error("failed", detail, job=3, target=TARGET, attempt="1/1")
        log.error("failed", "odd\x85one\u2028two\rthree\x1b[0m\n\n  end", job=4, target=TARGET)
        log.flush()
        with open(self.path("background_jobs_errors.log"), "rb") as f:
            text = f.read().decode("utf-8")
        lines = text.split("\n")
        self.assertEqual(lines[-1], "")
        lines = lines[:-1]
        self.assertEqual(text.splitlines(), lines)          # no hidden line breaks
        headers = [i for i, line in enumerate(lines) if re.match(TS, line)]
        self.assertEqual(len(headers), 2)
        self.assertRegex(lines[0], r"^%s event=failed job=3 target=%s attempt=1/1$"
                         % (TS, re.escape(TARGET)))
        first = lines[1:headers[1]]
        self.assertEqual(len(first), len(detail.splitlines()))
        for got, want in zip(first, detail.splitlines()):
            self.assertTrue(got[:1].isspace(), got)
            self.assertEqual(got.strip(), want.strip())
        for line in lines[headers[1] + 1:]:
            self.assertTrue(line[:1].isspace(), repr(line))
            self.assertNotIn("\x1b", line)
        self.assertNotIn("\x1b", text)
        # error() does not write to the events log; the caller logs the event line too.
        self.assertEqual(os.path.getsize(self.path("background_jobs.log")), 0)

    def test_rewind_forgets_lines_since_mark(self):
        log = jr.EventLog(self.tmp, clock=Clock())
        self.addCleanup(log.close)
        log.event("queued", job=1)
        mark = log.mark()
        log.event("queued", job=2)
        log.error("failed", "x", job=2)
        log.rewind(mark)
        log.flush()
        with open(self.path("background_jobs.log")) as f:
            self.assertEqual(len(f.read().splitlines()), 1)
        self.assertEqual(os.path.getsize(self.path("background_jobs_errors.log")), 0)


####################################################################################################
#  Protocol codec
####################################################################################################

class DecodeRequestTest(unittest.TestCase):
    def assert_bad(self, line):
        try:
            jr.decode_request(line)
        except jr.ProtocolError as exc:
            self.assertEqual(exc.code, "bad_request")
            self.assertTrue(exc.message)
        except BaseException as exc:        # any other type is a bug in the codec
            self.fail("%r raised %s, not ProtocolError" % (line[:60], type(exc).__name__))
        else:
            self.fail("%r was accepted" % line[:60])

    def test_valid_object(self):
        req = jr.decode_request('{"op": "add", "target": "x:Y", "args": [1, 2.5, "é", null],'
                                ' "kwargs": {"a": true}}\n'.encode())
        self.assertEqual(req, {"op": "add", "target": "x:Y", "args": [1, 2.5, "é", None],
                               "kwargs": {"a": True}})
        self.assertEqual(jr.decode_request(b'{"s": "\\ud83d\\ude00"}'), {"s": "😀"})

    def test_rejected_lines(self):
        cases = [b"", b"\n", b"not json", b"[1, 2]", b'"text"', b"42", b"null", b"true",
                 b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}', b'{"a": 1e999}',
                 b'{"a": -1e999}', b'{"a": 1E400}', b'{"a": "\xff"}', b'\xff\xfe{}',
                 b'{"a": "\xed\xa0\x80"}', b"{'a': 1}", b'{"a": 1} {"b": 2}', b'{"a": 1,}',
                 b"[" * 100_000, b'{"a":' * 100_000, b'{"a": [' + b"[" * 50_000 + b"]}",
                 b'{"n": ' + b"7" * 5000 + b"}", b'{"n": -' + b"1" * 5000 + b"}",
                 b'\xef\xbb\xbf{"op": "hello"}']
        for line in cases:
            with self.subTest(line=line[:40]):
                self.assert_bad(line)

    def test_every_prefix_of_a_request_is_a_dict_or_bad_request(self):
        full = '{"op": "add", "target": "a.b:C", "args": ["é✓😀", 1.5e3, [true, null]]}'.encode()
        for n in range(len(full)):
            with self.subTest(n=n):
                self.assert_bad(full[:n])
        self.assertIsInstance(jr.decode_request(full), dict)

    def test_nesting_deeper_than_json_max_depth_is_refused(self):
        # JSON_MAX_DEPTH: "deeper request JSON is refused before it can recurse".
        depth = jr.JSON_MAX_DEPTH
        ok = b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
        self.assertIsInstance(jr.decode_request(ok), dict)
        self.assert_bad(b'{"a": ' + b"[" * (depth + 1) + b"]" * (depth + 1) + b"}")

    def test_lone_surrogates_never_reach_the_store(self):
        # A lone surrogate escape cannot be written as UTF-8: the journal and replies encode
        # with "utf-8", so such a request must be refused here (or be encodable).
        for line in (b'{"op": "add", "args": ["\\ud800"]}', b'{"key": "x\\udfff"}',
                     b'{"\\udc80": 1}'):
            with self.subTest(line=line):
                try:
                    req = jr.decode_request(line)
                except jr.ProtocolError as exc:
                    self.assertEqual(exc.code, "bad_request")
                    continue
                try:
                    jr._json_line(req).encode("utf-8")
                except UnicodeEncodeError:
                    self.fail("decode_request accepted %r, which the journal cannot encode"
                              % line)


class ValidateAddTest(TempCase):
    NOW = 5000.0

    def setUp(self):
        super().setUp()
        self.cfg = jr.Config({}, self.tmp)

    def bad(self, req, code="bad_request", cfg=None):
        with self.assertRaises(jr.ProtocolError) as cm:
            jr.validate_add(req, cfg or self.cfg, self.NOW)
        self.assertEqual(cm.exception.code, code, cm.exception.message)
        return cm.exception.message

    def test_defaults_come_from_the_config(self):
        self.assertEqual(jr.validate_add({"target": TARGET}, self.cfg, self.NOW), {
            "target": TARGET, "method": None, "args": [], "kwargs": {}, "priority": 0,
            "run_at": self.NOW, "retries": 0, "retry_delay": 1.0, "backoff": "exponential",
            "timeout": 3600.0, "key": None, "queue": "default", "after": [],
            "on_parent_failure": "cancel", "delay": None})
        cfg = jr.Config({"retries": 3, "retry_delay": 2.5, "backoff": "fixed", "timeout": 10,
                         "allow": ["pkg.*:*"]}, self.tmp)
        got = jr.validate_add({"op": "add", "target": "pkg.mod:F"}, cfg, self.NOW)
        self.assertEqual((got["retries"], got["retry_delay"], got["backoff"], got["timeout"]),
                         (3, 2.5, "fixed", 10.0))
        no_limit = jr.Config({"timeout": 0}, self.tmp)
        self.assertIsNone(jr.validate_add({"target": TARGET}, no_limit, self.NOW)["timeout"])

    def test_given_fields_are_kept(self):
        req = {"target": TARGET, "method": "run", "args": [1, "a"], "kwargs": {"k": [1]},
               "priority": -7, "delay": 2.5, "retries": 4, "retry_delay": 0.5,
               "backoff": "fixed", "timeout": 1.5, "key": "uniq"}
        self.assertEqual(jr.validate_add(req, self.cfg, self.NOW), {
            "target": TARGET, "method": "run", "args": [1, "a"], "kwargs": {"k": [1]},
            "priority": -7, "run_at": self.NOW + 2.5, "retries": 4, "retry_delay": 0.5,
            "backoff": "fixed", "timeout": 1.5, "key": "uniq", "queue": "default", "after": [],
            "on_parent_failure": "cancel", "delay": 2.5})
        at = jr.validate_add({"target": TARGET, "run_at": self.NOW + 60}, self.cfg, self.NOW)
        self.assertEqual(at["run_at"], self.NOW + 60)

    def test_unknown_field_is_refused(self):
        self.assertIn("priorty", self.bad({"target": TARGET, "priorty": 1}))

    def test_delay_and_run_at_together_are_refused(self):
        self.bad({"target": TARGET, "delay": 1, "run_at": self.NOW + 1})

    def test_method_names(self):
        for method in ("_x", "__init__", "_", 5, "", "a-b", "a b", "a.b"):
            with self.subTest(method=method):
                self.bad({"target": TARGET, "method": method})
        self.assertIsNone(jr.validate_add({"target": TARGET, "method": None}, self.cfg,
                                          self.NOW)["method"])

    def test_target_syntax(self):
        for target in ("examples/jobs:X", "examples.jobs", "examples.jobs:", ":X",
                       "examples..jobs:X", " examples.jobs:X", "examples.jobs:X\n",
                       "examples.jobs:X:Y", "examples.jobs:1X", "examples.jobs:X.", "", 5, None,
                       ["examples.jobs:X"], "../examples.jobs:X"):
            with self.subTest(target=target):
                self.bad({"target": target})
        self.bad({})
        for target in (TARGET, "examples.jobs:Outer.Inner", "examples.a.b_c:F_1"):
            with self.subTest(target=target):
                self.assertEqual(jr.validate_add({"target": target}, self.cfg,
                                                 self.NOW)["target"], target)

    def test_targets_outside_the_allow_list(self):
        for target in ("os:system", "subprocess:run", "example.jobs:X", "examplesx:Y"):
            with self.subTest(target=target):
                self.bad({"target": target}, code="not_allowed")

    def test_bool_is_not_a_number(self):
        for field in ("priority", "retries", "retry_delay", "delay", "run_at", "timeout"):
            for value in (True, False):
                with self.subTest(field=field, value=value):
                    self.bad({"target": TARGET, field: value})

    def test_ill_typed_and_out_of_range_values(self):
        for field, value in [("args", {}), ("args", "a"), ("kwargs", []), ("priority", 1.5),
                             ("priority", "1"), ("retries", -1), ("delay", -1),
                             ("retry_delay", -0.5), ("backoff", "linear"), ("key", ""),
                             ("key", 5), ("timeout", 0), ("timeout", "10"),
                             ("priority", 2 ** 31), ("delay", 1e12), ("retries", 10 ** 6)]:
            with self.subTest(field=field, value=value):
                self.bad({"target": TARGET, field: value})

    def test_timeout_null_means_no_limit(self):
        self.assertIsNone(jr.validate_add({"target": TARGET, "timeout": None}, self.cfg,
                                          self.NOW)["timeout"])


class Utf8PrefixTest(unittest.TestCase):
    def test_never_cuts_a_character(self):
        for char in ("é", "€", "😀", "ü✓😀a"):
            data = ("ab" + char).encode()
            for cut in range(len(data) + 1):
                with self.subTest(char=char, cut=cut):
                    got = jr.utf8_prefix(data[:cut], complete=False)
                    self.assertTrue(data[:cut].startswith(got))
                    got.decode("utf-8")                 # strict: no partial character left
                    self.assertEqual(got, data[:cut].decode("utf-8", "ignore").encode())

    def test_each_multibyte_length_at_every_cut(self):
        for char, size in (("ß", 2), ("€", 3), ("𝄞", 4)):
            encoded = char.encode()
            self.assertEqual(len(encoded), size)
            for cut in range(size + 1):
                with self.subTest(char=char, cut=cut):
                    data = b"x" + encoded[:cut]
                    want = data if cut in (0, size) else b"x"
                    self.assertEqual(jr.utf8_prefix(data, complete=False), want)

    def test_complete_returns_input_unchanged(self):
        for data in (b"", b"abc", "€".encode()[:2], b"\xff\xfe", b"x\xf0\x9f"):
            with self.subTest(data=data):
                self.assertEqual(jr.utf8_prefix(data, complete=True), data)

    def test_empty_and_ascii(self):
        self.assertEqual(jr.utf8_prefix(b"", complete=False), b"")
        self.assertEqual(jr.utf8_prefix(b"hello\n", complete=False), b"hello\n")


####################################################################################################
#  Config
####################################################################################################

class ConfigTest(TempCase):
    def write(self, text, name="jobrunnerd.toml"):
        path = self.path("conf", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_defaults_match_spec(self):
        cfg = jr.load_config(None, {})
        base = os.path.dirname(os.path.realpath(jr.__file__))
        self.assertEqual(cfg.socket, os.path.join(base, "storage", "jobrunnerd.sock"))
        self.assertEqual(cfg.state_dir, os.path.join(base, "storage", "state"))
        self.assertEqual(cfg.log_dir, os.path.join(base, "storage", "logs"))
        self.assertEqual(cfg.job_paths, [base])
        expected = {"socket_mode": 0o600, "allowed_uids": [], "allowed_gids": [],
                    "allow": ["examples.*:*"], "retries": 0, "retry_delay": 1.0,
                    "backoff": "exponential", "max_retry_delay": 3600, "timeout": 3600,
                    "kill_grace": 5, "shutdown_grace": 30, "fsync": "always",
                    "max_request_bytes": 1048576, "max_connections": 256,
                    "max_queued": 1000000, "keep_finished": 604800,
                    "max_output_bytes": 1048576, "limits": {}, "start_method": "zygote",
                    "preload": []}
        for key, value in expected.items():
            with self.subTest(key=key):
                self.assertEqual(getattr(cfg, key), value)
                self.assertNotIsInstance(getattr(cfg, key), bool)
        self.assertEqual(cfg.workers, len(os.sched_getaffinity(0)) or 1)

    def test_relative_paths_resolve_against_the_config_file(self):
        path = self.write('socket = "run/j.sock"\nstate_dir = "st"\nlog_dir = "/var/tmp/x"\n'
                          'job_paths = ["jobs", "/opt/jobs", "."]\n')
        conf = self.path("conf")
        cfg = jr.load_config(path, {})
        self.assertEqual(cfg.socket, os.path.join(conf, "run", "j.sock"))
        self.assertEqual(cfg.state_dir, os.path.join(conf, "st"))
        self.assertEqual(cfg.log_dir, "/var/tmp/x")
        self.assertEqual(cfg.job_paths, [os.path.join(conf, "jobs"), "/opt/jobs", conf])
        self.assertEqual(cfg.path, path)

    def test_values_from_the_file(self):
        path = self.write('socket_mode = 0o660\nretries = 3\nbackoff = "fixed"\nfsync = "never"\n'
                          'allow = ["myapp.*:*"]\nlimits = {cpu = 60, memory = 1073741824}\n'
                          'workers = 2\nstart_method = "spawn"\npreload = ["json"]\n'
                          'allowed_uids = [1000]\ntimeout = 1.5\n')
        cfg = jr.load_config(path, {"workers": 5, "socket": None})
        self.assertEqual((cfg.socket_mode, cfg.retries, cfg.backoff, cfg.fsync, cfg.allow),
                         (0o660, 3, "fixed", "never", ["myapp.*:*"]))
        self.assertEqual(cfg.limits, {"cpu": 60, "memory": 1073741824})
        self.assertEqual((cfg.workers, cfg.start_method, cfg.preload, cfg.allowed_uids),
                         (5, "spawn", ["json"], [1000]))       # the command line wins
        self.assertEqual(cfg.timeout, 1.5)

    def test_unknown_key_is_an_error(self):
        path = self.write("retries = 1\nretrys = 2\n")
        with self.assertRaises(jr.ConfigError) as cm:
            jr.load_config(path, {})
        self.assertIn("retrys", str(cm.exception))

    def test_bad_values_are_errors(self):
        cases = ['retries = "3"', "retries = true", "retries = -1", "retry_delay = -1",
                 'fsync = "sometimes"', 'backoff = "linear"', "socket_mode = 0o1777",
                 'socket_mode = "rw"', "workers = 0", 'workers = "4"', 'allow = "examples.*:*"',
                 "allow = [1]", "job_paths = [\"\"]", 'socket = ""', "socket = 5",
                 "limits = {gpu = 1}", "limits = {cpu = 0}", 'limits = {cpu = "1"}',
                 "limits = 5", "max_queued = 0", "max_connections = 1.5", "timeout = true",
                 'start_method = "fork"', "preload = \"json\"", "allowed_uids = [-1]",
                 "max_output_bytes = -1", "keep_finished = -5", "kill_grace = \"5\""]
        for text in cases:
            with self.subTest(text=text):
                path = self.write(text + "\n")
                with self.assertRaises(jr.ConfigError):
                    jr.load_config(path, {})

    def test_unreadable_or_invalid_toml_is_a_config_error(self):
        with self.assertRaises(jr.ConfigError):
            jr.load_config(self.path("missing.toml"), {})
        with self.assertRaises(jr.ConfigError):
            jr.load_config(self.write("retries = = 1\n"), {})

    def test_bad_override_is_a_config_error(self):
        with self.assertRaises(jr.ConfigError):
            jr.load_config(None, {"workers": 0})


####################################################################################################
#  The handler table against SPEC
####################################################################################################

def spec_ops(path: str) -> list[str]:
    """The ops column of the first protocol table ("| op |") in a markdown file."""
    ops, in_table = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("| op |"):
                in_table = True
                continue
            if in_table:
                if not line.startswith("|"):
                    break
                if set(cells[0]) <= set("-: "):
                    continue
                ops.extend(re.findall(r"`([a-z_]+)`", cells[0]))
    return ops


class HandlersTest(unittest.TestCase):
    def test_handlers_are_the_documented_ops(self):
        self.assertEqual(len(SPEC_OPS), len(set(SPEC_OPS)))
        self.assertEqual(set(jr.HANDLERS), set(SPEC_OPS))
        self.assertEqual(set(jr.OP_FIELDS), set(SPEC_OPS))
        self.assertTrue(set(jr.MUTATING) <= set(SPEC_OPS))
        for op, handler in jr.HANDLERS.items():
            self.assertTrue(callable(handler), op)

    def test_handlers_match_the_documented_table(self):
        # The README's protocol table is the project's own statement of what is built (SPEC
        # names ops that are still to come): HANDLERS, OP_FIELDS and that table agree.
        ops = spec_ops(os.path.join(ROOT, "README.md"))
        self.assertEqual(len(ops), len(set(ops)), ops)
        self.assertEqual(set(ops), set(SPEC_OPS))
        self.assertEqual(set(ops), set(jr.HANDLERS))

    def test_docstring_lists_the_same_ops(self):
        listed = re.search(r"Ops: ([a-z_ \n]+?)\.", jr.__doc__).group(1).split()
        self.assertEqual(set(listed), set(SPEC_OPS))


####################################################################################################
#  Standard library only; no side effects on import
####################################################################################################

PROJECT = {"jobrunnerd", "jobctl", "examples"}


def imported_modules(source: str, filename: str) -> set[str]:
    """Top-level names of every module the source imports, anywhere (also inside functions),
    plus literal names given to importlib.import_module() / __import__()."""
    names = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif node.level > 0:
                names.add("examples" if "examples" in filename else "<relative>")
        elif isinstance(node, ast.Call) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                names.add(node.args[0].value.split(".")[0])
    return names


class StdlibOnlyTest(TempCase):
    def sources(self):
        files = [os.path.join(ROOT, "jobrunnerd.py"), os.path.join(ROOT, "jobctl.py")]
        files += sorted(glob.glob(os.path.join(ROOT, "examples", "**", "*.py"), recursive=True))
        for path in files:
            with open(path, encoding="utf-8") as f:
                yield path, f.read()

    def test_only_stdlib_and_project_imports(self):
        allowed = set(sys.stdlib_module_names) | PROJECT
        seen = 0
        for path, source in self.sources():
            seen += 1
            with self.subTest(file=os.path.relpath(path, ROOT)):
                extra = imported_modules(source, path) - allowed
                self.assertEqual(extra, set())
        self.assertGreaterEqual(seen, 3)
        # The code sent to job processes is held in strings: it must be stdlib-only too.
        for name in ("CHILD_BOOTSTRAP", "CHILD_SOURCE"):
            with self.subTest(source=name):
                self.assertEqual(imported_modules(getattr(jr, name), name)
                                 - set(sys.stdlib_module_names), set())

    def test_client_and_daemon_never_import_each_other_or_job_code(self):
        with open(os.path.join(ROOT, "jobctl.py"), encoding="utf-8") as f:
            ctl = imported_modules(f.read(), "jobctl.py")
        with open(os.path.join(ROOT, "jobrunnerd.py"), encoding="utf-8") as f:
            daemon = imported_modules(f.read(), "jobrunnerd.py")
        self.assertNotIn("jobrunnerd", ctl)
        self.assertNotIn("jobctl", daemon)
        self.assertNotIn("examples", ctl)
        self.assertNotIn("examples", daemon)

    def test_import_has_no_side_effects(self):
        probe = r'''
import json, os, signal, sys, threading
written = []
def audit(event, args):
    if event == "open":
        path, mode, flags = args
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (mode is None and isinstance(flags, int)
                 and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            written.append([event, str(path)])
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.chmod", "os.symlink", "os.link",
                   "os.truncate", "socket.bind", "socket.connect", "os.fork", "subprocess.Popen"):
        written.append([event, str(args[0]) if args else ""])
sys.addaudithook(audit)
sys.path.insert(0, sys.argv[1])
sigs = [signal.SIGTERM, signal.SIGCHLD, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE]
for s in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):   # an ignored signal is inherited
    signal.signal(s, signal.SIG_DFL)
before = [repr(signal.getsignal(s)) for s in sigs]
fds_before = sorted(os.listdir("/proc/self/fd"))
umask_before = os.umask(0o022); os.umask(umask_before)
import jobrunnerd
after = [repr(signal.getsignal(s)) for s in sigs]
fds_after = sorted(os.listdir("/proc/self/fd"))
umask_after = os.umask(0o022); os.umask(umask_after)
print(json.dumps({"signals": [before, after], "fds": [fds_before, fds_after],
                  "umask": [umask_before, umask_after], "wakeup": signal.set_wakeup_fd(-1),
                  "threads": threading.active_count(), "written": written}))
'''
        before = sorted(os.listdir(self.tmp))
        proc = subprocess.run([sys.executable, "-I", "-B", "-c", probe, ROOT], cwd=self.tmp,
                              capture_output=True, text=True, timeout=60,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stderr, "")
        report = json.loads(proc.stdout)
        self.assertEqual(report["signals"][0], report["signals"][1])
        self.assertEqual(report["fds"][0], report["fds"][1])
        self.assertEqual(report["umask"][0], report["umask"][1])
        self.assertEqual(report["wakeup"], -1)
        self.assertEqual(report["threads"], 1)
        self.assertEqual(report["written"], [])
        self.assertEqual(sorted(os.listdir(self.tmp)), before)



class SnapshotChunksTest(unittest.TestCase):
    """The snapshot is read a few MB at a time (bounded memory at a million jobs): the same
    records come back whatever the chunk size, and damage is reported at its byte offset."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.dir = self._tmp.name
        self.addCleanup(self._tmp.cleanup)

    def write_snapshot(self, n):
        store = jr.Store(self.dir, fsync=False)
        store.load()
        jobs = [jr.Job(id=i, target="examples.jobs:add", args=[i, "é" * (i % 3)], kwargs={},
                       priority=i % 5, state="pending", attempts=0, retries=0, retry_delay=1.0,
                       backoff="fixed", timeout=None, created_at=1.0, run_at=1.0)
                for i in range(1, n + 1)]
        store.snapshot({"next_id": n + 1, "paused": True}, jobs)
        store.close()
        return {job.id: job.stored() for job in jobs}

    def load(self, chunk):
        store = jr.Store(self.dir, fsync=False)
        store.SNAPSHOT_CHUNK = chunk
        try:
            return store.load()
        finally:
            store.close()

    def test_same_records_for_every_chunk_size(self):
        expected = self.write_snapshot(300)
        for chunk in (1, 50, 333, 4096, 1 << 22):
            meta, records = self.load(chunk)
            self.assertEqual(records, expected, "chunk size %d" % chunk)
            self.assertEqual(meta, {"next_id": 301, "paused": True})

    def test_records_become_jobs_as_they_are_read(self):
        self.write_snapshot(20)
        store = jr.Store(self.dir, fsync=False)
        store.SNAPSHOT_CHUNK = 100
        _, records = store.load(jr.Job.from_stored)
        store.close()
        self.assertTrue(all(isinstance(j, jr.Job) for j in records.values()))
        self.assertIs(records[3].state, records[4].state, "state strings are shared")

    def test_damage_inside_a_chunk_is_reported_at_its_offset(self):
        self.write_snapshot(100)
        path = os.path.join(self.dir, "queue.json")
        with open(path, "rb") as f:
            data = f.read()
        where = data.index(b'"id":57,')
        damaged = data[:where] + b"@" + data[where + 1:]
        with open(path, "wb") as f:
            f.write(damaged)
        for chunk in (1, 200, 1 << 22):
            with self.assertRaises(jr.StateError) as cm:
                self.load(chunk)
            self.assertIn("offset %d" % where, str(cm.exception), "chunk size %d" % chunk)
            with open(path, "rb") as f:
                self.assertEqual(f.read(), damaged)

    def test_a_snapshot_in_another_layout_still_loads(self):
        doc = {"format": 1, "gen": 0, "next_id": 3, "paused": False, "jobs": [
            {"id": 2, "target": "examples.jobs:add", "state": "failed", "retries": 0,
             "priority": 0, "run_at": 1.0, "created_at": 1.0, "finished_at": 2.0}]}
        with open(os.path.join(self.dir, "queue.json"), "w") as f:
            json.dump(doc, f, indent=2)             # hand-written, not one job a line
        meta, records = self.load(10)
        self.assertEqual(list(records), [2])
        self.assertEqual(meta["next_id"], 3)



class DeferredSyncTest(unittest.TestCase):
    """A journal write no reply waits for is written at once but fsynced up to SYNC_DELAY
    later; one that a reply waits for is fsynced before commit() returns."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self._tmp.cleanup)
        self.store = jr.Store(self._tmp.name, fsync=True)
        self.store.load()
        self.addCleanup(self.store.close)
        self.syncs = 0
        real = os.fdatasync

        def counting(fd):
            self.syncs += 1
            return real(fd)
        patcher = mock.patch.object(jr.os, "fdatasync", counting)
        patcher.start()
        self.addCleanup(patcher.stop)

    def journal_size(self):
        return os.path.getsize(os.path.join(self._tmp.name, "journal.jsonl"))

    def test_unacknowledged_change_is_written_now_and_synced_later(self):
        before = self.journal_size()
        self.store.append({"paused": True})
        self.store.commit(sync=False)
        self.assertEqual(self.syncs, 0)
        self.assertGreater(self.journal_size(), before, "written at once: a crash keeps it")
        due = self.store.sync_due()
        self.assertIsNotNone(due)
        self.assertLessEqual(due - time.monotonic(), jr.SYNC_DELAY)
        with mock.patch.object(jr.time, "monotonic", return_value=due + 0.001):
            self.store.commit(sync=False)           # nothing new, but the delay is over
        self.assertEqual(self.syncs, 1)
        self.assertIsNone(self.store.sync_due())

    def test_a_reply_waiting_syncs_everything_written_before(self):
        self.store.append({"paused": True})
        self.store.commit(sync=False)
        self.store.append({"paused": False})
        self.store.commit(sync=True)
        self.assertEqual(self.syncs, 1)
        self.assertIsNone(self.store.sync_due())

    def test_failed_deferred_sync_cuts_back_to_the_durable_length(self):
        durable = self.journal_size()
        self.store.append({"paused": True})
        self.store.commit(sync=False)
        with mock.patch.object(jr.os, "fdatasync", side_effect=OSError(errno.EIO, "EIO")):
            with self.assertRaises(OSError):
                self.store.commit(sync=True)
        self.assertIsNotNone(self.store.broken)
        self.assertEqual(self.journal_size(), durable)



class CopyThroughSnapshotTest(unittest.TestCase):
    """A fold copies the old snapshot's line of every job not journaled since, and encodes
    only the touched ones; what loads back is always exactly the jobs in memory."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self._tmp.cleanup)
        self.dir = self._tmp.name

    @staticmethod
    def job(i, **fields):
        values = dict(id=i, target="examples.jobs:add", args=[i], kwargs={}, priority=0,
                      state="pending", attempts=0, retries=0, retry_delay=1.0,
                      backoff="fixed", timeout=None, created_at=1.0, run_at=1.0)
        values.update(fields)
        return jr.Job(**values)

    def reload(self):
        store = jr.Store(self.dir, fsync=False)
        _, records = store.load()
        return store, records

    def test_random_changes_between_folds_load_back_exactly(self):
        rng = random.Random(7)
        store = jr.Store(self.dir, fsync=False)
        store.load()
        jobs, next_id = {}, 1
        for round_no in range(12):
            for _ in range(rng.randrange(1, 60)):
                op = rng.random()
                if op < 0.3 or not jobs:
                    jobs[next_id] = self.job(next_id, args=["x" * rng.randrange(5), next_id])
                    store.append({"job": jobs[next_id].stored()})
                    next_id += 1
                elif op < 0.5:                  # a batch, as JobTable.create journals it
                    new = [self.job(next_id + k, args=[{"id": k, "s": ",\t{"}], key="k,\t")
                           for k in range(rng.randrange(1, 5))]
                    store.append_records([j.id for j in new], [jr._encode(j.stored())
                                                               for j in new])
                    jobs.update((j.id, j) for j in new)
                    next_id += len(new)
                elif op < 0.8:
                    j = rng.choice(list(jobs.values()))
                    j.priority += 1
                    store.append({"job": j.stored()})
                else:
                    gone = rng.sample(sorted(jobs), min(len(jobs), rng.randrange(1, 4)))
                    for i in gone:
                        del jobs[i]
                    store.append({"del": gone})
            store.commit()
            if round_no % 3 == 2:               # sometimes reload first: touched = replayed ids
                store.close()
                store, records = self.reload()
                self.assertEqual(records, {i: j.stored() for i, j in jobs.items()})
            store.snapshot({"next_id": next_id, "paused": False}, dict(jobs))
            store.close()
            store, records = self.reload()
            self.assertEqual(records, {i: j.stored() for i, j in jobs.items()},
                             "round %d" % round_no)

    def first_snapshot(self, n: int):
        """A store whose first snapshot holds jobs 1..n; (store, {id: job})."""
        store = jr.Store(self.dir, fsync=False)
        store.load()
        jobs = {i: self.job(i) for i in range(1, n + 1)}
        store.snapshot({"next_id": n + 1, "paused": False}, jobs)
        return store, jobs

    @staticmethod
    def encoded_by_snapshot(store, next_id, jobs) -> list[int]:
        """Take a snapshot; return the ids of the jobs it encoded (instead of copying)."""
        calls = []
        real = jr.Job.stored
        with mock.patch.object(jr.Job, "stored", lambda job: calls.append(job.id) or real(job)):
            store.snapshot({"next_id": next_id, "paused": False}, jobs)
        return calls

    def test_only_jobs_journaled_more_than_once_are_encoded(self):
        store, jobs = self.first_snapshot(100)      # the first: all encoded
        jobs[7].priority = 5                    # once: its journal record is copied
        store.append({"job": jobs[7].stored()})
        for priority in (6, 8):                 # twice: only memory knows which is current
            jobs[9].priority = priority
            store.append({"job": jobs[9].stored()})
        jobs[101] = self.job(101)               # a new job, in a batch entry
        store.append_records([101], [jr._encode(jobs[101].stored())])
        store.commit()
        self.assertEqual(self.encoded_by_snapshot(store, 102, jobs), [9])
        store.close()
        _, records = self.reload()
        self.assertEqual((records[7]["priority"], records[9]["priority"]), (5, 8))
        self.assertEqual(records, {i: j.stored() for i, j in jobs.items()})

    def test_unwritten_or_failed_journal_lines_are_never_copied(self):
        store, jobs = self.first_snapshot(3)
        jobs[2].priority = 3
        store.append({"job": jobs[2].stored()})     # appended, not yet written
        self.assertEqual(self.encoded_by_snapshot(store, 4, jobs), [2])
        store.close()
        _, records = self.reload()
        self.assertEqual(records[2]["priority"], 3)

    def test_a_journal_that_disagrees_with_the_counts_is_not_copied(self):
        # Should the journal ever miss a record the counts expect, or hold one twice, the fold
        # encodes every job from memory instead: no job lost, none twice.
        for damage in ("missing", "twice"):
            with self.subTest(damage=damage):
                shutil.rmtree(self.dir)
                os.makedirs(self.dir)
                store, jobs = self.first_snapshot(3)
                jobs[4] = self.job(4)
                store.append_records([4], [jr._encode(jobs[4].stored())])
                store.commit()
                path = os.path.join(self.dir, "journal.jsonl")
                with open(path, "rb") as f:
                    lines = f.readlines()
                with open(path, "wb") as f:
                    f.writelines(lines[:1] if damage == "missing" else lines + lines[1:])
                store.snapshot({"next_id": 5, "paused": False}, jobs)
                store.close()
                _, records = self.reload()
                self.assertEqual(records, {i: j.stored() for i, j in jobs.items()})

    def test_a_snapshot_in_another_layout_is_encoded_whole(self):
        jobs = {i: self.job(i) for i in (1, 2, 3)}
        with open(os.path.join(self.dir, "queue.json"), "w") as f:
            json.dump({"format": 1, "gen": 0, "next_id": 4, "paused": False,
                       "jobs": [j.stored() for j in jobs.values()]}, f, indent=1)
        store = jr.Store(self.dir, fsync=False)
        store.load()
        self.assertIsNone(store.touched, "not our layout: nothing can be copied")
        jobs[2].priority = 9
        store.append({"job": jobs[2].stored()})
        store.snapshot({"next_id": 4, "paused": False}, jobs)
        store.close()
        _, records = self.reload()
        self.assertEqual(records, {i: j.stored() for i, j in jobs.items()})

    def test_a_copy_that_gives_up_half_way_leaves_no_temp_file(self):
        store, jobs = self.first_snapshot(5)
        path = os.path.join(self.dir, "queue.json")
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:             # a line that does not start with its id
            f.write(data.replace(b'{"id":3,', b'{"target":"x","id":3,', 1))
        store.append({"job": jobs[1].stored()})
        store.snapshot({"next_id": 6, "paused": False}, jobs)
        self.assertFalse(os.path.exists(path + ".tmp"))
        store.close()
        _, records = self.reload()
        self.assertEqual(records, {i: j.stored() for i, j in jobs.items()})



class ZygoteFallbackTest(unittest.TestCase):
    """A zygote that cannot even be started counts as a quick death: after three, attempts
    are spawned as fresh interpreters instead of failing forever."""

    def test_three_failed_starts_then_spawn(self):
        with tempfile.TemporaryDirectory() as tmp:
            os.makedirs(os.path.join(tmp, "output"))
            cfg = jr.Config({"log_dir": tmp, "state_dir": tmp}, tmp)
            runner = jr.Runner(cfg, jr.Loop(), lambda a: None, lambda a: None,
                               lambda a, e: None)
            job = jr.Job(id=1, target="examples.jobs:add", args=[1, 2], kwargs={},
                         state="pending", attempts=0, retries=0, timeout=None)
            gc.collect()                # no finalizer of an earlier test's leftovers runs now
            gc.disable()
            self.addCleanup(gc.enable)
            fds_before = set(os.listdir("/proc/self/fd"))
            with mock.patch.object(jr, "Zygote", side_effect=OSError(errno.EAGAIN, "no")), \
                    mock.patch.object(runner, "_spawn", side_effect=RuntimeError("spawned")):
                for _ in range(jr.Runner.ZYGOTE_QUICK_DEATHS):
                    with self.assertRaises(OSError):
                        runner.start(job, 1)
                with self.assertRaisesRegex(RuntimeError, "spawned"):
                    runner.start(job, 1)
            self.assertEqual(set(os.listdir("/proc/self/fd")) - fds_before, set(), "fd leaked")
            self.assertEqual(runner.active, {})



class AttemptReportTest(unittest.TestCase):
    """What a child writes to fd 3 is job code's to choose: only what the journal can hold is
    taken as its report (the rest would crash the daemon at the next write, after every
    restart again)."""

    def report(self, data: bytes):
        att = jr.Attempt(jr.Job(id=1), 1, 1)
        att.chan_in += data
        return att.report()

    def test_a_good_report_is_taken(self):
        self.assertEqual(self.report(b'junk\n{"status": "ok", "result": [1, "\\u00e9"]}\n'),
                         {"status": "ok", "result": [1, "\u00e9"]})

    def test_what_could_not_be_stored_is_no_report(self):
        for data in (b'{"status": "ok", "result": ' + b"[" * 100000 + b"]" * 100000 + b"}",
                     b'{"status": "ok", "result": ' + b"[" * 500 + b"]" * 500 + b"}",
                     b'{"status": "ok", "result": "\\ud800"}', b'{"status": "ok", "res',
                     b'[1, 2]', b'\xff\xfe'):
            with self.subTest(data=data[:40]):
                self.assertEqual(self.report(data + b"\n")["status"], "invalid")


class GroupCommitTest(TempCase):
    """Daemon.gather(): before the fsync of a pass, the next request of a client that was busy a
    moment ago is served in the same pass (one fsync for both), and nobody else is waited for."""

    def make_daemon(self):
        cfg = jr.load_config(None, {"socket": self.path("s.sock"), "state_dir": self.path("state"),
                                    "log_dir": self.path("logs"), "start_method": "spawn"})
        return in_process_daemon(self, cfg)

    def connect(self, daemon):
        return support.client_of(self, daemon)

    ADD = b'{"op":"add","target":"examples.jobs:add","args":[1,2]}\n'

    def test_one_pass_of_many_clients_is_one_write_and_one_fdatasync(self):
        daemon = self.make_daemon()
        peers = [self.connect(daemon)[1] for _ in range(5)]
        for i, peer in enumerate(peers):
            peer.sendall(self.ADD.replace(b"[1,2]", b"[%d,2]" % i) * 2)    # two adds each
        journal = daemon.store.fd
        real_write = os.write
        writes = []

        def counting_write(fd, data):
            if fd == journal:
                writes.append(bytes(data))
            return real_write(fd, data)
        with mock.patch.object(jr.os, "write", counting_write), \
                mock.patch.object(jr.os, "fdatasync", wraps=os.fdatasync) as fdatasync:
            daemon.run_pass(1.0)
        self.assertEqual(len(writes), 1, "one write for the pass")
        self.assertEqual(fdatasync.call_count, 1, "one fdatasync for the pass")
        self.assertEqual(writes[0].count(b'{"id":'), 10, "every add of every client in it")
        for peer in peers:
            peer.settimeout(10)
            data = b""
            while data.count(b"\n") < 2:
                data += peer.recv(4096)
            self.assertEqual(data.count(b'"ok":true'), 2, data)

    def test_a_recently_busy_client_shares_the_pass(self):
        daemon = self.make_daemon()
        daemon.store.sync_seconds = 10.0        # as if fsyncs were slow: gather may wait
        busy, busy_peer = self.connect(daemon)
        idle, idle_peer = self.connect(daemon)
        idle.last_input -= 10 * jr.GATHER_ACTIVE
        busy_peer.sendall(self.ADD)
        busy.last_input = time.monotonic()      # recent, however slowly this test ran so far
        daemon.gather()
        self.assertEqual(len(busy.slots), 1)    # served now, not in the next pass
        self.assertEqual(idle.slots, [])
        self.assertEqual(len(daemon.batch_slots), 1)

    def test_no_reply_leaves_before_the_commit(self):
        # A client that is both readable and writable (it has unread replies): the reply to its
        # new add must wait for the journal; here the write fails, so it must be io_error.
        daemon = self.make_daemon()
        conn, peer = self.connect(daemon)
        conn.slots.append([b'{"ok":true,"earlier":1}\n'])     # made, not yet sent
        peer.sendall(self.ADD)
        daemon.jobs.track()
        mark = daemon.log.mark()
        daemon.on_client(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
        peer.setblocking(False)
        self.assertRaises(BlockingIOError, peer.recv, 4096)
        with mock.patch.object(daemon.store, "commit",
                               side_effect=OSError(errno.ENOSPC, "No space left on device")), \
                contextlib.redirect_stderr(io.StringIO()):
            daemon.commit(mark)
        daemon.flush()
        peer.setblocking(True)
        peer.settimeout(10)
        data = b""
        while data.count(b"\n") < 2:
            data += peer.recv(4096)
        earlier, reply = data.splitlines()
        self.assertEqual(json.loads(reply)["error"]["code"], "io_error")
        self.assertEqual(daemon.jobs.jobs, {})

    def test_an_empty_batch_journals_nothing(self):
        daemon = self.make_daemon()
        conn, peer = self.connect(daemon)
        peer.sendall(b'{"op":"add_batch","jobs":[]}\n')
        daemon.on_client(conn, selectors.EVENT_READ)
        self.assertEqual(daemon.store.lines, [])
        self.assertEqual(conn.slots, [[b'{"ok":true,"ids":[]}\n']])

    def test_nobody_is_waited_for_when_no_other_client_is_busy(self):
        daemon = self.make_daemon()
        daemon.store.sync_seconds = 10.0
        lone, peer = self.connect(daemon)
        daemon.dirty.add(lone)                  # served this pass already
        started = time.monotonic()
        daemon.gather()
        busy, _ = self.connect(daemon)          # busy but silent: waited for GATHER_MAX at most
        daemon.gather()
        self.assertLess(time.monotonic() - started, 10 * jr.GATHER_MAX + 2.0)
        self.assertEqual((lone.slots, busy.slots), ([], []))


if __name__ == "__main__":
    unittest.main()
