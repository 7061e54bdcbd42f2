"""Job dependencies (SPEC §2b): `after`, `on_parent_failure`, the state `blocked`.

    DepTableTest     JobTable stepped with a clock: blocking, unblocking (delay counted from
                     then), cancel cascades (a chain of 10,000), `run`, retry putting back the
                     descendants, prune keeping parents, undo restoring every index
    DepProtocolTest  through the socket: add / add_batch validation, negative entries, queue_full
                     and keys counting blocked jobs, list --state blocked, prune
    DepJobctlTest    jobctl add --after / --on-parent-failure, show, --wait on a cancelled child
    DepCrashTest     an ETL chain of 4 jobs, SIGKILL of the daemon before, while and after a
                     parent runs: every job runs exactly once, in order, none left blocked
"""
import itertools
import json
import os
import time
import unittest

import errno
from unittest import mock

from tests import support
from tests.test_durability import InProcessDaemonCase
from tests.test_units import TableCase, TARGET
import jobrunnerd as jr


def expected_indexes(table):
    """children, unfinished and live_children rebuilt from scratch from the jobs."""
    children, unfinished, live_children = {}, {}, {}
    for job in table.jobs.values():
        for parent_id in job.after:
            children.setdefault(parent_id, {})[job.id] = None
            parent = table.jobs.get(parent_id)
            if parent is not None and parent.state in jr.LIVE:
                unfinished[job.id] = unfinished.get(job.id, 0) + 1
            if job.state in jr.LIVE:
                live_children[parent_id] = live_children.get(parent_id, 0) + 1
    return children, unfinished, live_children


class DepTableTest(TableCase):

    def add(self, table, job_delay=None, **fields):
        """A new job (validated fields, as validate_add gives them); `job_delay` is the add's
        `delay`, which a blocked job counts from its unblocking."""
        now = self.clock()
        values = dict(target=TARGET, method=None, args=[], kwargs={}, priority=0,
                      run_at=now + (job_delay or 0.0), retries=0, retry_delay=1.0,
                      backoff="exponential", timeout=None, key=None, uid=0, delay=job_delay)
        values.update(fields)
        return table.create(now, [values])[0]

    def assert_deps_consistent(self, table):
        self.assert_consistent(table)
        children, unfinished, live_children = expected_indexes(table)
        self.assertEqual({p: set(c) for p, c in table.children.items()},
                         {p: set(c) for p, c in children.items()})
        self.assertEqual(table.unfinished, unfinished)
        self.assertEqual(table.live_children, live_children)

    def succeed(self, table, job):
        self.start(table, job)
        table.transition(job, jr.SUCCEEDED)

    def fail(self, table, job):
        self.start(table, job)
        table.transition(job, jr.FAILED, changes={"error": "boom"})

    def events(self, table):
        return "".join(table.log.buffers["events"])

    def test_a_child_waits_for_every_parent_then_is_pending(self):
        table = self.make_table()
        a, b = self.add(table), self.add(table)
        c = self.add(table, after=[a.id, b.id])
        self.assertEqual(c.state, jr.BLOCKED)
        self.assertEqual(table.unfinished[c.id], 2)
        self.assertRegex(self.events(table), r"event=blocked job=%d .*after=%d,%d"
                         % (c.id, a.id, b.id))
        self.assertEqual(self.drain(table), [a.id, b.id])       # a blocked job is never due
        self.start(table, a)
        table.transition(a, jr.PENDING, "interrupted")           # (back to pending: still live)
        a = table.pop_due(self.clock())
        self.succeed(table, a)
        self.assertEqual(c.state, jr.BLOCKED)
        self.succeed(table, b)
        self.assertEqual(c.state, jr.PENDING)
        self.assertIn("event=unblocked job=%d" % c.id, self.events(table))
        self.assertEqual(self.drain(table), [c.id])
        self.assert_deps_consistent(table)

    def test_the_delay_of_a_blocked_job_counts_from_its_unblocking(self):
        table = self.make_table()
        p = self.add(table)
        c = self.add(table, after=[p.id], job_delay=30.0)
        late = self.add(table, after=[p.id], run_at=self.clock() + 1000)
        self.clock.advance(100)
        self.drain(table)
        self.succeed(table, p)
        self.assertEqual(c.run_at, self.clock() + 30)          # from now, not from the add
        self.assertEqual(late.run_at, self.clock() + 900)      # an explicit later run_at holds
        self.assertIsNone(c.delay)
        self.assertEqual(self.drain(table), [])
        self.clock.advance(30)
        self.assertEqual(self.drain(table), [c.id])

    def test_a_failed_parent_cancels_the_child_and_its_children(self):
        table = self.make_table()
        p, other = self.add(table), self.add(table)
        c = self.add(table, after=[p.id, other.id])
        g = self.add(table, after=[c.id])
        runner = self.add(table, after=[p.id], on_parent_failure="run")
        self.drain(table)
        self.fail(table, p)
        self.assertEqual((c.state, c.error, c.cancelled_by), (jr.CANCELLED, "parent %d failed"
                                                               % p.id, p.id))
        self.assertEqual((g.state, g.error), (jr.CANCELLED, "parent %d cancelled" % c.id))
        self.assertEqual(runner.state, jr.PENDING)              # "run": pending anyway
        self.assertIn("event=cancelled job=%d" % g.id, self.events(table))
        self.assertIn(c, table.changed)                         # waiters hear of it
        self.assert_deps_consistent(table)

    def test_cancel_of_a_blocked_job_cascades(self):
        table = self.make_table()
        p = self.add(table)
        c = self.add(table, after=[p.id])
        g = self.add(table, after=[c.id])
        table.transition(c, jr.CANCELLED)
        self.assertEqual((g.state, g.error), (jr.CANCELLED, "parent %d cancelled" % c.id))
        self.assertEqual(p.state, jr.PENDING)
        self.assert_deps_consistent(table)

    def test_a_chain_of_10000_cascades_without_recursion(self):
        table = self.make_table()
        first = self.add(table)
        prev = first
        batch_ids = []
        for _ in range(10_000):
            prev = self.add(table, after=[prev.id])
            batch_ids.append(prev.id)
        self.drain(table)
        self.fail(table, first)
        self.assertEqual(table.counts[jr.CANCELLED], 10_000)
        self.assertEqual(table.jobs[batch_ids[-1]].error, "parent %d cancelled" % batch_ids[-2])
        # and retry puts all 10,000 back, blocked
        back = table.retry(first)
        self.assertEqual(len(back), 10_000)
        self.assertEqual(table.counts[jr.BLOCKED], 10_000)
        self.assertEqual(first.state, jr.PENDING)

    def test_a_parent_finished_at_add_counts_at_once(self):
        table = self.make_table()
        ok, bad = self.add(table), self.add(table)
        self.drain(table)
        self.succeed(table, ok)
        self.fail(table, bad)
        after_ok = self.add(table, after=[ok.id])
        after_bad = self.add(table, after=[ok.id, bad.id])
        live = self.add(table)
        with_live = self.add(table, after=[live.id, bad.id])     # cancelled now, not later
        runs = self.add(table, after=[bad.id], on_parent_failure="run")
        self.assertEqual(after_ok.state, jr.PENDING)
        self.assertEqual((after_bad.state, after_bad.error), (jr.CANCELLED,
                                                             "parent %d failed" % bad.id))
        self.assertEqual(runs.state, jr.PENDING)
        self.assertEqual((with_live.state, with_live.error),
                         (jr.CANCELLED, "parent %d failed" % bad.id))
        self.assert_deps_consistent(table)

    def test_retry_puts_back_exactly_the_descendants_cancelled_because_of_it(self):
        table = self.make_table()
        p, q = self.add(table), self.add(table)
        c = self.add(table, after=[p.id])
        g = self.add(table, after=[c.id])
        by_q = self.add(table, after=[q.id])
        by_hand = self.add(table, after=[p.id])
        table.transition(by_hand, jr.CANCELLED)                 # the user's, not p's
        self.drain(table)
        self.fail(table, p)
        self.fail(table, q)
        back = table.retry(p)
        self.assertEqual([j.id for j in back], [c.id, g.id])
        self.assertEqual((c.state, c.attempts, c.error, c.cancelled_by),
                         (jr.BLOCKED, 0, None, None))
        self.assertEqual(g.state, jr.BLOCKED)
        self.assertEqual(by_q.state, jr.CANCELLED)
        self.assertEqual(by_hand.state, jr.CANCELLED)
        self.assert_deps_consistent(table)
        self.assertEqual(self.drain(table), [p.id])
        self.succeed(table, p)
        self.assertEqual(c.state, jr.PENDING)

    def test_a_put_back_job_with_another_failed_parent_is_cancelled_when_unblocked(self):
        table = self.make_table()
        p, h = self.add(table), self.add(table)
        g = self.add(table, after=[p.id, h.id])
        self.drain(table)
        self.fail(table, p)
        self.fail(table, h)
        self.assertEqual(g.cancelled_by, p.id)
        table.retry(p)
        self.assertEqual(g.state, jr.BLOCKED)
        self.assertEqual(self.drain(table), [p.id])
        self.succeed(table, p)
        self.assertEqual((g.state, g.error), (jr.CANCELLED, "parent %d failed" % h.id))
        self.assert_deps_consistent(table)

    def test_retry_of_a_child_whose_parent_is_live_blocks_it(self):
        table = self.make_table()
        p = self.add(table)
        c = self.add(table, after=[p.id])
        table.transition(c, jr.CANCELLED)
        table.retry(c)
        self.assertEqual(c.state, jr.BLOCKED)
        self.assertIn("event=blocked job=%d" % c.id, self.events(table))

    def test_prune_keeps_a_parent_a_live_job_lists_and_looks_at_it_once(self):
        table = self.make_table()
        p = self.add(table)
        c = self.add(table, after=[p.id], run_at=self.clock() + 100)
        self.drain(table)
        self.succeed(table, p)
        self.assertEqual(c.state, jr.PENDING)
        self.clock.advance(1)
        self.assertEqual(table.finished_before(self.clock()), [])
        self.assertIn(p.id, table.kept)
        self.assertEqual(table.finished, [])                     # off the heap: not rescanned
        self.clock.advance(100)
        self.assertEqual(self.drain(table), [c.id])
        self.assertEqual(table.finished, [])                     # running is live too
        self.start(table, c)
        table.transition(c, jr.SUCCEEDED)
        self.assertEqual({j.id for j in table.finished_before(self.clock())}, {p.id, c.id})

    def test_undo_restores_children_and_counts(self):
        table = self.make_table()
        p, q = self.add(table), self.add(table)
        c = self.add(table, after=[p.id, q.id])
        g = self.add(table, after=[c.id])
        old = self.add(table)
        self.drain(table)
        self.succeed(table, old)
        self.fail(table, q)                                       # cancels c and g
        before = (expected_indexes(table), table.counts.copy(),
                  {j.id: j.stored() for j in table.jobs.values()})
        table.track()
        table.retry(q)                                            # c, g blocked again
        self.succeed(table, p)
        fresh = self.add(table, after=[c.id, old.id])
        table.remove([old])
        self.start(table, q)
        table.transition(q, jr.FAILED)                            # cancels c, g, fresh
        self.assertEqual(fresh.state, jr.CANCELLED)
        table.undo()
        self.assert_deps_consistent(table)
        self.assertEqual((expected_indexes(table), table.counts,
                          {j.id: j.stored() for j in table.jobs.values()}), before)
        self.assertNotIn(fresh.id, table.jobs)

    def test_load_rebuilds_the_indexes_and_settles_orphans(self):
        table = self.make_table()
        p = self.add(table)
        c = self.add(table, after=[p.id])
        d = self.add(table, after=[p.id], on_parent_failure="run")
        table.store.commit(sync=False)
        # What a crash between p's end and its children's unblocking would leave (it cannot
        # happen through the daemon: both go in one write; an older state dir or hand edit).
        rec = p.stored()
        rec.update(state="failed", finished_at=self.clock())
        table.store.append({"job": rec})
        table.store.commit(sync=False)
        table.store.close()
        store = jr.Store(table.store.dir, fsync=False)
        self.addCleanup(store.close)
        meta, records = store.load(jr.Job.from_stored)
        again = jr.JobTable(store, table.log, clock=self.clock)
        again.load(meta, records)
        self.assertEqual(again.jobs[c.id].state, jr.BLOCKED)
        self.assertEqual(again.jobs[c.id].after, [p.id])
        self.assertEqual(again.jobs[d.id].on_parent_failure, "run")
        self.assertEqual(again.settle_orphans(), 2)
        self.assertEqual(again.jobs[c.id].state, jr.CANCELLED)
        self.assertEqual(again.jobs[d.id].state, jr.PENDING)
        self.assert_deps_consistent(again)

    def test_a_missing_parent_counts_as_ended_without_failing(self):
        table = self.make_table()
        records = {5: {"id": 5, "target": TARGET, "state": "blocked", "created_at": 1.0,
                       "retries": 0, "after": [3]}}
        fresh = jr.JobTable(table.store, table.log, clock=self.clock)
        fresh.load({"next_id": 6, "paused": False}, records)
        self.assertEqual(fresh.settle_orphans(), 1)
        self.assertEqual(fresh.jobs[5].state, jr.PENDING)

    def test_stored_record_keeps_the_fields_only_when_not_default(self):
        table = self.make_table()
        p = self.add(table)
        plain = self.add(table)
        c = self.add(table, after=[p.id], on_parent_failure="run", job_delay=5.0)
        self.assertNotIn("after", plain.stored())
        self.assertNotIn("on_parent_failure", plain.stored())
        self.assertEqual({k: c.stored()[k] for k in ("after", "on_parent_failure", "delay")},
                         {"after": [p.id], "on_parent_failure": "run", "delay": 5.0})
        self.assertEqual(plain.record()["after"], [])
        self.assertEqual(plain.record()["on_parent_failure"], "cancel")
        self.assertNotIn("delay", c.record())


def batch_chain(names, target="examples.jobs:add", **extra):
    """add_batch jobs: each after the one before it."""
    jobs = []
    for i, name in enumerate(names):
        job = {"target": target, "args": [name], **extra}
        if i:
            job["after"] = [-1]
        jobs.append(job)
    return jobs


class DepProtocolTest(support.DaemonTestCase):
    config = {"max_queued": 20, "allow": ["examples.*:*", "flaky:*"]}

    def error(self, **req):
        reply = self.daemon.call(**req)
        self.assertFalse(reply["ok"], reply)
        return reply["error"]["code"], reply["error"]["message"]

    def test_after_validation(self):
        add = dict(op="add", target="examples.jobs:ExampleJob")
        self.assertEqual(self.error(**add, after=[99])[0], "not_found")
        self.assertIn("99", self.error(**add, after=[99])[1])
        for bad in ([-1], [0], "1", [1.5], [True], list(range(1, 1002)), [2 ** 70]):
            with self.subTest(after=bad):
                self.assertEqual(self.error(**add, after=bad)[0], "bad_request")
        self.assertEqual(self.error(**add, on_parent_failure="ignore")[0], "bad_request")
        batch = [{"target": "examples.jobs:ExampleJob"},
                 {"target": "examples.jobs:ExampleJob", "after": [-2]}]
        code, message = self.error(op="add_batch", jobs=batch)
        self.assertEqual(code, "bad_request")
        self.assertIn("jobs[1]", message)
        self.assertEqual(self.daemon.call(op="stats")["counts"]["pending"], 0)  # all or nothing

    def test_add_batch_with_negative_entries_is_one_graph(self):
        root = self.daemon.add(target="examples.jobs:DelayedJob", args=[30])
        reply = self.daemon.call(op="add_batch", jobs=[
            {"target": "examples.jobs:ExampleJob", "after": [root]},
            {"target": "examples.jobs:ExampleJob", "after": [root]},
            {"target": "examples.jobs:ExampleJob", "after": [-1, -2, root, -1],
             "on_parent_failure": "run"}])
        self.assertTrue(reply["ok"], reply)
        a, b, c = reply["ids"]
        job = self.daemon.get(c)
        self.assertEqual((job["state"], job["after"], job["on_parent_failure"]),
                         ("blocked", [b, a, root], "run"))
        listed = self.daemon.call(op="list", state="blocked")["jobs"]
        self.assertEqual([j["id"] for j in listed], [a, b, c])
        self.assertEqual(self.daemon.call(op="stats")["counts"]["blocked"], 3)
        self.daemon.call(op="cancel", id=root)
        for job_id in (a, b):
            job = self.daemon.wait_job(job_id, timeout=10)
            self.assertEqual((job["state"], job["error"]),
                             ("cancelled", "parent %d cancelled" % root))
        self.assertEqual(self.daemon.wait_job(c)["state"], "succeeded")   # "run"
        events = [e["event"] for e in self.daemon.job_events(c)]
        self.assertEqual(events[:2], ["blocked", "unblocked"])

    def test_queue_full_and_keys_count_blocked_jobs(self):
        root = self.daemon.add(target="examples.jobs:DelayedJob", args=[30])
        first = self.daemon.add(after=[root], key="k")
        again = self.daemon.call(op="add", target="examples.jobs:ExampleJob", key="k")
        self.assertEqual((again["id"], again["created"]), (first, False))
        reply = self.daemon.call(op="add_batch", jobs=[
            {"target": "examples.jobs:ExampleJob", "after": [root]}] * 18)
        self.assertTrue(reply["ok"], reply)
        self.assertEqual(self.error(op="add", target="examples.jobs:ExampleJob",
                                    after=[root])[0], "queue_full")

    def test_retry_counts_the_descendants_it_puts_back_against_max_queued(self):
        jobs = [{"target": "examples.jobs:ErrorJob"}] + \
            [{"target": "examples.jobs:ExampleJob", "after": [-1]}] * 5
        ids = self.daemon.call(op="add_batch", jobs=jobs)["ids"]
        self.daemon.wait_job(ids[-1])
        self.daemon.call(op="add_batch", jobs=[{"target": "examples.jobs:ExampleJob",
                                                "delay": 3600}] * 15)
        self.assertEqual(self.error(op="retry", id=ids[0])[0], "queue_full")   # 15 + 6 > 20
        self.assertEqual(self.daemon.get(ids[1])["state"], "cancelled")
        self.daemon.call(op="cancel", id=ids[-1] + 1)
        self.daemon.call(op="pause")                # the root must not fail again meanwhile
        self.assertTrue(self.daemon.call(op="retry", id=ids[0])["ok"])          # 14 + 6
        self.assertEqual(self.daemon.get(ids[5])["state"], "blocked")

    def test_prune_keeps_a_parent_while_a_live_job_lists_it(self):
        parent = self.daemon.add()
        self.daemon.wait_job(parent)
        blocker = self.daemon.add(delay=3600)
        child = self.daemon.add(after=[parent, blocker])
        self.assertEqual(self.daemon.call(op="prune")["removed"], 0)
        self.assertEqual(self.daemon.get(parent)["state"], "succeeded")
        self.daemon.call(op="cancel", id=blocker)
        self.daemon.wait_job(child)
        self.assertEqual(self.daemon.call(op="prune")["removed"], 3)
        self.assertFalse(self.daemon.call(op="get", id=parent)["ok"])

    def test_retry_of_a_failed_parent_puts_back_its_descendants(self):
        self.write_job_module("flaky", (
            "import os\n"
            "def step(path):\n"
            "    if not os.path.exists(path):\n"
            "        raise RuntimeError('no ' + path)\n"))
        flag = os.path.join(self.root, "flag")
        reply = self.daemon.call(op="add_batch", jobs=[
            {"target": "flaky:step", "args": [flag]},
            {"target": "examples.jobs:ExampleJob", "after": [-1]},
            {"target": "examples.jobs:ExampleJob", "after": [-1]}])
        self.assertTrue(reply["ok"], reply)
        p, c, g = reply["ids"]
        self.assertEqual(self.daemon.wait_job(g)["error"], "parent %d cancelled" % c)
        self.assertEqual(self.daemon.get(c)["error"], "parent %d failed" % p)
        open(flag, "w").close()
        reply = self.daemon.call(op="retry", id=p)
        self.assertTrue(reply["ok"], reply)
        self.assertEqual(self.daemon.wait_job(g)["state"], "succeeded")
        self.assertEqual(self.daemon.get(c)["attempts"], 1)


class DepJobctlTest(support.DaemonTestCase):

    def test_add_after_show_and_wait(self):
        d = self.daemon
        root = d.add(target="examples.jobs:ErrorJob")
        other = d.add()
        done = d.jobctl("add", "examples.jobs:ExampleJob", "x", "--after", str(root), str(other),
                        "--on-parent-failure", "run")
        self.assertEqual(done.returncode, 0, done.stderr)
        runs = int(done.stdout)
        self.assertEqual(d.get(runs)["after"], [root, other])
        self.assertEqual(d.get(runs)["args"], ["x"])
        done = d.jobctl("add", "examples.jobs:ExampleJob", "--after", str(root), "y", "--wait")
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)   # cancelled by root
        self.assertIn("cancelled: parent %d failed" % root, done.stdout)
        cancelled = int(done.stdout.split()[0])
        self.assertEqual(d.get(cancelled)["args"], ["y"])       # an ARG after the ids
        shown = d.jobctl("show", str(runs))
        self.assertRegex(shown.stdout, r"after\s*:?\s*%d, %d" % (root, other))
        self.assertRegex(shown.stdout, r"on_parent_failure\s*:?\s*run")
        self.assertEqual(d.wait_job(runs)["state"], "succeeded")
        bad = d.jobctl("add", "examples.jobs:ExampleJob", "--after", "999")
        self.assertEqual(bad.returncode, 2)
        self.assertIn("999", bad.stderr)
        late, later = d.add(delay=3600), d.add(delay=3600)
        waiting = d.add(after=[late, other, runs, later])
        listed = d.jobctl("list", "--state", "blocked")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertRegex(listed.stdout, r"\n\s*%d\s+blocked .*after %d,%d,%d,\.\.\."
                         % (waiting, late, other, runs))


class DepDiskErrorTest(InProcessDaemonCase):
    """A write that fails (EIO) leaves the children index and the counts as they were."""

    def snapshot(self):
        table = self.d.jobs
        return (expected_indexes(table), {p: set(c) for p, c in table.children.items()},
                dict(table.unfinished), dict(table.live_children), dict(table.counts),
                {j.id: j.stored() for j in table.jobs.values()})

    def test_refused_changes_are_undone_with_their_dependencies(self):
        self.assertTrue(self.call(op="pause")["ok"])
        parent = self.call(op="add", target=TARGET)["id"]
        ids = self.call(op="add_batch", jobs=[
            {"target": TARGET, "after": [parent]}, {"target": TARGET, "after": [-1]}])["ids"]
        failed = self.call(op="add", target=TARGET, after=ids)["id"]
        self.assertTrue(self.call(op="cancel", id=ids[0])["ok"])          # cancels ids[1], failed
        before = self.snapshot()
        self.assertEqual(before[0][1:], (before[2], before[3]))
        eio = OSError(errno.EIO, "injected EIO")
        with mock.patch.object(jr.os, "fdatasync", side_effect=eio), \
                mock.patch.object(jr.os, "fsync", side_effect=eio):
            for req in ({"op": "cancel", "id": parent},                   # no child to settle
                        {"op": "retry", "id": ids[0]},                    # puts back two
                        {"op": "add", "target": TARGET, "after": [parent, ids[1]]},
                        {"op": "add_batch", "jobs": [{"target": TARGET, "after": [ids[0]]},
                                                     {"target": TARGET, "after": [-1, parent]}]}):
                with self.subTest(req=req):
                    reply = self.call(**req)
                    self.assertEqual(reply["error"]["code"], "io_error", reply)
                    self.assertEqual(self.snapshot(), before)
        self.assertEqual(self.d.jobs.jobs[failed].error, "parent %d cancelled" % ids[0])


ETL_MODULE = """
import os, time
def step(path, name, gate):
    # Says it started (a marker file), waits for its gate, then appends its name: killed
    # before the gate opens, it has done nothing; its line is written once per success.
    open(path + "." + name + ".started", "w").close()
    while not os.path.exists(gate):
        time.sleep(0.01)
    with open(path, "a") as f:
        f.write(name + "\\n")
        f.flush()
        os.fsync(f.fileno())
"""

STEPS = ("extract", "transform", "clean", "load")


class DepCrashTest(support.DaemonTestCase):
    """kill -9 at points of an ETL chain of 4: every step runs exactly once, in order."""

    config = {"allow": ["examples.*:*", "etl:*"]}

    def prepare(self):
        self.write_job_module("etl", ETL_MODULE)

    def restart(self):
        self.daemon.kill()
        self.daemon.start()

    def lines(self, path):
        try:
            with open(path) as f:
                return [line for line in f.read().split("\n") if line]
        except FileNotFoundError:
            return []

    def states(self, ids):
        return [self.daemon.get(i)["state"] for i in ids]

    def test_kill_before_while_and_after_each_step(self):
        out = os.path.join(self.root, "out")
        gate = {name: os.path.join(self.root, "gate-" + name) for name in STEPS}
        started = {name: "%s.%s.started" % (out, name) for name in STEPS}
        self.daemon.call(op="pause")
        jobs = [{"target": "etl:step", "args": [out, name, gate[name]], "retries": 3}
                for name in STEPS]
        for job in jobs[1:]:
            job["after"] = [-1]
        ids = self.daemon.call(op="add_batch", jobs=jobs)["ids"]
        self.restart()                                  # before any step ran
        self.assertEqual(self.states(ids), ["pending", "blocked", "blocked", "blocked"])
        self.daemon.call(op="resume")
        for i, name in enumerate(STEPS):
            support.wait_until(lambda: os.path.exists(started[name]), 15,
                               message="%s to start" % name)
            self.assertEqual(self.states(ids[i + 1:]), ["blocked"] * (3 - i))
            self.restart()                              # while the parent runs
            os.unlink(started[name])
            open(gate[name], "w").close()
            job = self.daemon.wait_job(ids[i])
            # Interrupted once here; maybe once more by the kill right after its parent
            # ended, if it had started by then. Its work (the line) is done once all the same.
            self.assertEqual(job["state"], "succeeded")
            self.assertIn(job["attempts"], (2, 3) if i else (2,))
            self.restart()                              # right after it ended
            self.assertEqual(self.lines(out), list(STEPS[:i + 1]))
        self.assertEqual(self.states(ids), ["succeeded"] * 4)
        self.assertEqual(self.lines(out), list(STEPS))
        self.assertEqual(self.daemon.call(op="list", state="blocked")["jobs"], [])
        started_events = [int(e["job"]) for e in self.daemon.events() if e["event"] == "started"]
        # in order (a line may be lost to a kill before the log's flush: not counted here)
        self.assertEqual([k for k, _ in itertools.groupby(started_events)], ids)

    def test_start_up_settles_jobs_blocked_on_a_parent_that_ended(self):
        # A state a crash cannot leave (a parent's end and its children's settling are one
        # write) but an older or hand-edited state dir can: the parent ended, children blocked.
        parent = self.daemon.add(delay=3600)
        stays = self.daemon.add(delay=3600)
        cancel = self.daemon.add(after=[parent])
        runs = self.daemon.add(after=[parent], on_parent_failure="run")
        waits = self.daemon.add(after=[parent, stays])
        record = {"id": parent, "target": "examples.jobs:ExampleJob", "state": "failed",
                  "created_at": time.time(), "finished_at": time.time(), "retries": 0,
                  "error": "by hand"}
        self.daemon.stop()
        with open(os.path.join(self.daemon.state_dir, "journal.jsonl"), "a") as f:
            f.write(json.dumps({"job": record}) + "\n")
        self.daemon.start()
        self.assertEqual(self.states([cancel, runs, waits]),
                         ["cancelled", "pending", "cancelled"])
        self.assertEqual(self.daemon.get(cancel)["error"], "parent %d failed" % parent)
        self.assertEqual(self.daemon.call(op="list", state="blocked")["jobs"], [])

    def test_a_failed_step_cancels_the_rest_across_a_kill(self):
        out = os.path.join(self.root, "out")
        jobs = [{"target": "etl:step", "args": [out, name, os.path.join(self.root, "g")]}
                for name in STEPS]
        jobs[1]["target"] = "examples.jobs:ErrorJob"
        for job in jobs[1:]:
            job["after"] = [-1]
        open(os.path.join(self.root, "g"), "w").close()
        ids = self.daemon.call(op="add_batch", jobs=jobs)["ids"]
        self.daemon.wait_job(ids[3])
        self.restart()
        self.assertEqual(self.states(ids), ["succeeded", "failed", "cancelled", "cancelled"])
        self.assertEqual(self.daemon.get(ids[2])["error"], "parent %d failed" % ids[1])
        self.assertEqual(self.daemon.get(ids[3])["error"], "parent %d cancelled" % ids[2])
        self.daemon.call(op="pause")                    # the retried step waits for resume
        reply = self.daemon.call(op="retry", id=ids[1])
        self.assertTrue(reply["ok"], reply)
        self.assertEqual(self.states(ids[1:]), ["pending", "blocked", "blocked"])
        self.restart()                                  # the put-back is durable
        self.assertEqual(self.states(ids[1:]), ["pending", "blocked", "blocked"])
        self.daemon.call(op="resume")
        self.assertEqual(self.daemon.wait_job(ids[1])["state"], "failed")
        self.daemon.wait_job(ids[3])
        self.assertEqual(self.states(ids[2:]), ["cancelled", "cancelled"])
        self.assertEqual(self.lines(out), ["extract"])


if __name__ == "__main__":
    unittest.main()
