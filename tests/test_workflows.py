"""The parts built apart, together: named queues and dependencies (issue #14) meet in JobTable,
the log and the `queues` reply; schedules (#15) meet metrics, `top` and the bulk ops (#16).
These check what neither part's own tests do.

    QueuedDependenciesTableTest  JobTable stepped with a clock: a blocked job counts in its own
                                 queue and starts there once unblocked; a cascade over three
                                 queues moves each queue's counts and logs each job's queue=;
                                 undo() after a failed write restores the counts of both kinds
    EtlOverQueuesTest            through the socket: an ETL chain whose steps run in different
                                 queues, queued with one add_batch, runs in order; a failed step
                                 cancels the rest in their queues, and `queues` counts them
    SchedulesInMetricsAndTopTest fires and triggers count in enqueued_total, each schedule has
                                 its next-fire gauge, and `top --once` lists the next fires
    WhereScheduleTest            cancel/retry `where` with `schedule`; a bulk retry counts in
                                 enqueued_total
    SettleInSlicesTest           a parent's children settled a slice per pass (in process), a
                                 refused slice undone and settled again
    SettleSlicesCrashTest        SIGKILL between two slices: after the restart every child is
                                 settled, none twice
"""
import errno
import os
import re
import unittest
from unittest import mock

from tests import support
from tests import test_queues
from tests.test_durability import InProcessDaemonCase
import jobrunnerd as jr

TARGET = "examples.jobs:ExampleJob"


class QueuedDependenciesTableTest(unittest.TestCase):
    # the queues' table fixture (a table with queues emails and reports), not its tests
    setUp = test_queues.TableQueuesTest.setUp
    clock = test_queues.TableQueuesTest.clock
    make_table = test_queues.TableQueuesTest.make_table
    add = test_queues.TableQueuesTest.add
    counts = test_queues.TableQueuesTest.counts

    def events(self):
        return "".join(self.table.log.buffers["events"])

    def finish(self, job, state=jr.SUCCEEDED):
        self.table.transition(job, jr.RUNNING, changes={"attempts": job.attempts + 1})
        self.table.transition(job, state)

    def test_a_blocked_job_counts_in_its_queue_and_starts_there_once_unblocked(self):
        parent = self.add("reports")
        child = self.add("emails", after=[parent.id], on_parent_failure="cancel")
        self.assertEqual(child.state, jr.BLOCKED)
        self.assertEqual(self.counts("emails"), {"blocked": 1})
        self.assertEqual(self.counts("reports"), {"pending": 1})
        self.assertRegex(self.events(), r"event=blocked job=%d \S+ queue=emails" % child.id)
        started = self.table.scheduler.next_job(self.now)
        self.assertIs(started, parent, "the blocked job is on no heap")
        self.assertIsNone(self.table.scheduler.next_job(self.now))
        self.table.scheduler.queue("reports").running += 1      # what the Dispatcher does
        self.finish(parent)
        self.table.scheduler.queue("reports").running -= 1
        self.assertEqual(child.state, jr.PENDING)
        self.assertEqual(self.counts("emails"), {"pending": 1})
        self.assertRegex(self.events(), r"event=unblocked job=%d \S+ queue=emails" % child.id)
        self.assertIs(self.table.scheduler.next_job(self.now), child)

    def test_a_cascade_over_three_queues_moves_each_queues_counts(self):
        root = self.add()
        kids = [self.add("emails", after=[root.id]) for _ in range(3)]
        grandchild = self.add("reports", after=[kids[0].id])
        self.finish(root, jr.FAILED)
        self.assertEqual(self.counts("emails"), {"cancelled": 3})
        self.assertEqual(self.counts("reports"), {"cancelled": 1})
        self.assertEqual(self.counts("default"), {"failed": 1})
        self.assertEqual(grandchild.error, "parent %d cancelled" % kids[0].id)
        lines = self.events()
        for kid in kids:
            self.assertRegex(lines, r"event=cancelled job=%d \S+ queue=emails .*error=" % kid.id)
        self.assertRegex(lines, r"event=cancelled job=%d \S+ queue=reports" % grandchild.id)
        self.assertNotRegex(lines, r"job=%d [^\n]*queue=" % root.id, "default: no queue=")

    def test_undo_restores_the_counts_of_both_kinds(self):
        parent = self.add("reports")
        self.table.store.commit()
        before = (self.counts("emails"), self.counts("reports"), dict(self.table.unfinished),
                  dict(self.table.children))
        self.table.track()
        child = self.add("emails", after=[parent.id])
        self.finish(parent, jr.FAILED)
        self.assertEqual(child.state, jr.CANCELLED)
        self.table.undo()
        self.table.store.discard()
        self.assertEqual((self.counts("emails"), self.counts("reports"),
                          dict(self.table.unfinished), dict(self.table.children)), before)
        self.assertNotIn(child.id, self.table.jobs)


class EtlOverQueuesTest(support.DaemonTestCase):
    config = {"workers": 1, "queues": {"ingest": {"workers": 1}, "db": {"workers": 1}}}

    def queues(self):
        return {q["name"]: q for q in self.daemon.call(op="queues")["queues"]}

    def chain(self, base):
        steps = [{"target": "examples.etl:extract", "args": [base], "queue": "ingest"},
                 {"target": "examples.etl:transform", "args": [base], "after": [-1]},
                 {"target": "examples.etl:load", "args": [base], "queue": "db", "after": [-1]}]
        reply = self.daemon.call(op="add_batch", jobs=steps)
        self.assertTrue(reply["ok"], reply)
        return reply["ids"]

    def test_a_chain_over_three_queues_runs_in_order(self):
        base = os.path.join(self.daemon.root, "temps")
        with open(base + ".csv", "w") as f:
            f.write("Oslo,-3.5\nLima,19\n")
        ids = self.chain(base)
        jobs = [self.daemon.wait_job(i, timeout=30) for i in ids]
        self.assertEqual([j["state"] for j in jobs], ["succeeded"] * 3, jobs)
        self.assertEqual([j["queue"] for j in jobs], ["ingest", "default", "db"])
        for earlier, later in zip(jobs, jobs[1:]):
            self.assertLessEqual(earlier["finished_at"], later["started_at"])
        self.assertEqual(jobs[2]["result"], 2)
        unblocked = [e for e in self.daemon.events() if e.get("event") == "unblocked"]
        self.assertEqual([(int(e["job"]), e.get("queue")) for e in unblocked],
                         [(ids[1], None), (ids[2], "db")])

    def test_a_failed_step_cancels_the_rest_in_their_queues(self):
        ids = self.chain(os.path.join(self.daemon.root, "missing"))   # no .csv: extract fails
        last = self.daemon.wait_job(ids[2], timeout=30)
        self.assertEqual(last["state"], "cancelled")
        self.assertEqual(last["error"], "parent %d cancelled" % ids[1])
        self.assertEqual(self.daemon.get(ids[1])["error"], "parent %d failed" % ids[0])
        q = self.queues()
        self.assertEqual((q["ingest"]["counts"]["failed"], q["default"]["counts"]["cancelled"],
                          q["db"]["counts"]["cancelled"]), (1, 1, 1))
        self.assertEqual(sum(q["db"]["counts"].values()), 1)
        out = self.daemon.jobctl("queues")
        self.assertEqual(out.returncode, 0, out)
        self.assertRegex(out.stdout, re.compile(r"^db\b", re.M))


if __name__ == "__main__":
    unittest.main()


class SchedulesInMetricsAndTopTest(support.DaemonTestCase):
    """Schedules meet metrics and top: a fire and a trigger count in enqueued_total of their
    queue, each schedule has its next-fire gauge, and top's panel lists it."""
    config = {"queues": {"ingest": {"workers": 1}},
              "schedules": {"tick": {"target": "examples.jobs:ExampleJob", "every": 0.3,
                                     "queue": "ingest"},
                            "nightly": {"target": "examples.jobs:ExampleJob",
                                        "cron": "30 3 * * *", "timezone": "UTC"}}}

    def sample(self, text, name, **labels):
        want = ",".join('%s="%s"' % kv for kv in sorted(labels.items()))
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            if head.startswith(name + "{") and \
                    ",".join(sorted(head[len(name) + 1:-1].split(","))) == want:
                return float(value)
        return None

    def test_fires_and_triggers_are_counted_and_the_next_fires_shown(self):
        support.wait_until(lambda: self.daemon.call(op="list", schedule="tick")["jobs"], 15,
                           message="a fire of tick")
        reply = self.daemon.call(op="trigger", schedule="nightly")
        self.assertTrue(reply["ok"] and reply["created"], reply)
        self.daemon.wait_job(reply["id"])
        text = self.daemon.call(op="metrics")["text"]
        fired = self.daemon.call(op="list", schedule="tick", limit=1000)["total"]
        self.assertGreaterEqual(self.sample(text, "jobrunner_enqueued_total", queue="ingest"), 1)
        self.assertLessEqual(self.sample(text, "jobrunner_enqueued_total", queue="ingest"),
                             self.daemon.call(op="list", schedule="tick", limit=1000)["total"])
        self.assertGreaterEqual(fired, 1)
        self.assertEqual(self.sample(text, "jobrunner_enqueued_total", queue="default"), 1)
        nightly = self.sample(text, "jobrunner_schedule_next_run_timestamp_seconds",
                              schedule="nightly")
        self.assertEqual(nightly % 86400, 3 * 3600 + 30 * 60)
        self.assertIsNotNone(self.sample(text, "jobrunner_schedule_next_run_timestamp_seconds",
                                         schedule="tick"))
        out = self.daemon.jobctl("top", "--once")
        self.assertEqual(out.returncode, 0, out)
        self.assertRegex(out.stdout, r"(?m)^nightly\s+\S")
        self.assertRegex(out.stdout, r"(?m)^tick\s+\S")


class WhereScheduleTest(support.DaemonTestCase):
    """cancel/retry `where` with `schedule` (the bulk ops and the schedules met at the merge),
    and a bulk retry counted in enqueued_total of its queue."""
    config = {"queues": {"ingest": {"workers": 1}},
              "schedules": {"a": {"target": "examples.jobs:ExampleJob", "every": 3600,
                                  "queue": "ingest"},
                            "b": {"target": "examples.jobs:ExampleJob", "every": 3600}}}

    def enqueued(self, queue):
        for line in self.daemon.call(op="metrics")["text"].splitlines():
            if line.startswith('jobrunner_enqueued_total{queue="%s"} ' % queue):
                return float(line.split()[-1])
        return 0.0

    def test_where_schedule_picks_that_schedules_jobs_only(self):
        self.assertTrue(self.daemon.call(op="pause")["ok"])
        a = self.daemon.call(op="trigger", schedule="a")["id"]
        b = self.daemon.call(op="trigger", schedule="b")["id"]
        reply = self.daemon.call(op="cancel", where={"schedule": "a"})
        self.assertEqual(reply.get("ids"), [a], reply)
        self.assertEqual(self.daemon.get(b)["state"], "pending")
        self.assertEqual(self.enqueued("ingest"), 1)
        reply = self.daemon.call(op="retry", where={"schedule": "a", "state": "cancelled"})
        self.assertEqual(reply.get("ids"), [a], reply)
        self.assertEqual(self.daemon.get(a)["state"], "pending")
        self.assertEqual(self.enqueued("ingest"), 2, "the bulk retry counts")
        reply = self.daemon.call(op="cancel", where={"schedule": "no such!"})
        self.assertEqual(reply["error"]["code"], "bad_request")
        self.assertIn("where: schedule", reply["error"]["message"])
        out = self.daemon.jobctl("cancel", "--schedule", "b")
        self.assertEqual(out.returncode, 0, out)
        self.assertEqual(self.daemon.get(b)["state"], "cancelled")
        self.assertEqual(self.daemon.get(a)["state"], "pending")


class SettleInSlicesTest(InProcessDaemonCase):
    """A parent's end settles its children SETTLE_SLICE at a time, a loop pass each (10,000
    at once held the loop ~140 ms); a slice whose write fails is settled again later."""

    def pending(self, ids):
        return sum(self.d.jobs.jobs[i].state == jr.PENDING for i in ids)

    def test_children_settle_a_slice_per_pass_and_a_refused_slice_again(self):
        self.assertTrue(self.call(op="pause")["ok"])
        parent = self.call(op="add", target=TARGET)["id"]
        kids = self.call(op="add_batch", jobs=[{"target": TARGET, "after": [parent],
                                                "on_parent_failure": "run"}] * 8)["ids"]
        with mock.patch.object(self.d.jobs, "settle_budget", 3):
            self.assertTrue(self.call(op="cancel", id=parent)["ok"])
            self.assertEqual(self.pending(kids), 3, "one slice with the parent's change")
            self.assertTrue(self.d.jobs.settling_left)
            self.assertEqual(self.d.select_timeout(), 0.0, "the loop does not sleep on it")
            self.d.run_pass(0)                  # the second slice
            self.assertEqual(self.pending(kids), 6)
            eio = OSError(errno.EIO, "injected EIO")
            with mock.patch.object(self.d.store, "commit", side_effect=eio):
                self.d.run_pass(0)              # the last slice, refused: undone
            self.assertEqual(self.pending(kids), 6)
            self.assertTrue(self.d.jobs.settling_left, "the refused slice is still to do")
            support.wait_until(lambda: self.d.run_pass(0) or not self.d.jobs.settling_left,
                               10, message="every slice settled")
        self.assertEqual(self.pending(kids), 8)
        self.assertEqual([self.d.jobs.jobs[i].state for i in kids], [jr.PENDING] * 8)


# The daemon settles 3 children per pass, and is SIGKILLed right after a pass that left
# children to settle. After the restart it is not killed again: start-up settles what is left
# before the daemon sets its budget.
KILL_BETWEEN_SLICES = support.kill_after_commit(
    "jr.SETTLE_SLICE = 3", "self.jobs.settling_left and self.jobs.settle_budget is not None")


class SettleSlicesCrashTest(support.DaemonTestCase):
    daemon_preamble = KILL_BETWEEN_SLICES

    def test_a_kill_between_slices_loses_no_child_and_settles_none_twice(self):
        d = self.daemon
        self.assertTrue(d.call(op="pause")["ok"])
        parent = d.add()
        kids = d.call(op="add_batch", jobs=[{"target": TARGET, "after": [parent],
                                             "on_parent_failure": "run"}] * 8)["ids"]
        with d.raw() as c:
            c.send(op="cancel", id=parent)
            try:
                c.recv()                        # the reply may or may not come first
            except (ConnectionError, OSError, ValueError):
                pass
        d.proc.wait(10)
        self.assertEqual(d.proc.returncode, -9, "killed between two slices")
        d.stderr.close()
        d.start()                               # start-up settles the rest (no budget yet)
        self.assertEqual([d.get(i)["state"] for i in kids], ["pending"] * 8)
        self.assertEqual(d.get(parent)["state"], "cancelled")
        unblocked = [int(e["job"]) for e in d.events() if e.get("event") == "unblocked"]
        self.assertEqual(sorted(unblocked), kids, "each child unblocked once")
