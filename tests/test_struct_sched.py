"""The scheduling half of the daemon's structure (#13), stepped without sockets or processes:

- Scheduler and Queue: which pending job starts next and when the next one is due, with a
  `now` argument; a queue's worker slots and its pause decide whether anything starts.
- attempt_outcome(): the one function that says what an ended attempt makes of its job (success,
  retry, failure, a stop's attempt that does not count, an attempt a crash interrupted).
- No switch for tests in the product: tests reach those states through seams instead.
"""
import os
import re
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jobrunnerd as jr  # noqa: E402

TARGET = "examples.jobs:ExampleJob"
NOW = 1_000_000.0


def job(job_id, priority=0, run_at=NOW, state=jr.PENDING, attempts=0, retries=3,
        retry_delay=2.0, backoff="fixed") -> jr.Job:
    return jr.Job(id=job_id, target=TARGET, state=state, priority=priority, run_at=run_at,
                  attempts=attempts, retries=retries, retry_delay=retry_delay, backoff=backoff,
                  pid=None, pid_start=None)


class SchedulerTest(unittest.TestCase):
    def scheduler(self, *jobs, workers=2) -> jr.Scheduler:
        s = jr.Scheduler(workers)
        s.jobs = {j.id: j for j in jobs}
        for j in jobs:
            s.add(j, NOW)
        return s

    def test_best_priority_first_then_fifo_and_delayed_jobs_wait_for_now(self):
        a, b, c = job(1), job(2, priority=5), job(3)
        late = job(4, priority=9, run_at=NOW + 10)
        s = self.scheduler(a, b, c, late)
        self.assertEqual(s.due_in(NOW), 0.0)
        order = [s.next_job(NOW, 0).id for _ in range(3)]
        self.assertEqual(order, [2, 1, 3])
        self.assertIsNone(s.next_job(NOW, 0))
        self.assertEqual(s.due_in(NOW), 10.0)
        self.assertEqual(s.next_run_at(), NOW + 10)
        self.assertIsNone(s.next_job(NOW + 9.999, 0))
        self.assertIs(s.next_job(NOW + 10, 0), late)
        self.assertIsNone(s.due_in(NOW + 10), "nothing pending")

    def test_slots_and_pause_decide_whether_anything_starts(self):
        s = self.scheduler(job(1), job(2), workers=1)
        self.assertFalse(s.may_start(1))
        self.assertIsNone(s.next_job(NOW, 1), "the only slot is taken")
        s.default.paused = True
        self.assertFalse(s.may_start(0))
        self.assertIsNone(s.next_job(NOW, 0), "paused")
        s.default.paused = False
        self.assertEqual(s.next_job(NOW, 0).id, 1)
        self.assertEqual(s.queues, {jr.DEFAULT_QUEUE: s.default})
        self.assertEqual((s.default.name, s.default.workers), ("default", 1))

    def test_a_stale_entry_is_skipped(self):
        a, b = job(1), job(2)
        s = self.scheduler(a, b)
        a.token += 1                    # the table moved it (cancelled, say)
        self.assertIs(s.next_job(NOW, 0), b)
        self.assertIsNone(s.next_job(NOW, 0))
        self.assertIsNone(s.due_in(NOW))

    def test_the_table_keeps_no_heap_of_its_own(self):
        table = jr.JobTable.__new__(jr.JobTable)
        self.assertFalse(hasattr(jr.JobTable, "_drop_stale"))
        for name in ("ready", "delayed"):
            self.assertNotIn(name, vars(table))


class AttemptOutcomeTest(unittest.TestCase):
    def running(self, attempts=1, retries=3):
        return job(7, state=jr.RUNNING, attempts=attempts, retries=retries)

    def test_success(self):
        out = jr.attempt_outcome(self.running(), jr.Ending(jr.ENDED_OK, 0, result=[1]), NOW, 60.0)
        self.assertEqual((out.state, out.event), (jr.SUCCEEDED, None))
        self.assertEqual(out.changes, {"pid": None, "pid_start": None, "result": [1],
                                       "exit_code": 0, "error": None})

    def test_a_failure_is_retried_while_retries_are_left_then_fails(self):
        ending = jr.Ending(jr.ENDED_ERROR, 1, "boom\n  again", "Traceback ...")
        out = jr.attempt_outcome(self.running(attempts=1), ending, NOW, 60.0)
        self.assertEqual((out.state, out.event, out.detail), (jr.PENDING, "retrying",
                                                              "Traceback ..."))
        self.assertEqual(out.changes["run_at"], NOW + 2.0)
        self.assertEqual(out.changes["error"], "boom again")
        self.assertEqual(out.fields, {"exit_code": 1, "error": "boom again", "run_at": NOW + 2.0})
        out = jr.attempt_outcome(self.running(attempts=4), ending, NOW, 60.0)
        self.assertEqual((out.state, out.event), (jr.FAILED, None))
        self.assertNotIn("run_at", out.changes)

    def test_a_permanent_failure_is_never_retried(self):
        out = jr.attempt_outcome(self.running(), jr.Ending(jr.ENDED_PERMANENT, 1, "no"), NOW, 60.0)
        self.assertEqual(out.state, jr.FAILED)

    def test_an_attempt_the_stop_ended_does_not_count(self):
        out = jr.attempt_outcome(self.running(attempts=2), jr.Ending(jr.ENDED_SHUTDOWN, -15),
                                 NOW, 60.0)
        self.assertEqual((out.state, out.event), (jr.PENDING, "interrupted"))
        self.assertEqual((out.changes["attempts"], out.changes["run_at"]), (1, NOW))
        self.assertEqual(out.fields, {"attempt": "2/4"})

    def test_an_attempt_a_crash_interrupted_is_retried_or_fails(self):
        out = jr.attempt_outcome(self.running(), jr.Ending(jr.ENDED_INTERRUPTED), NOW, 60.0)
        self.assertEqual((out.state, out.event, out.announce), (jr.PENDING, "interrupted", None))
        self.assertEqual(out.changes["run_at"], NOW + 2.0)
        out = jr.attempt_outcome(self.running(attempts=1, retries=0),
                                 jr.Ending(jr.ENDED_INTERRUPTED), NOW, 60.0)
        self.assertEqual((out.state, out.announce), (jr.FAILED, "interrupted"))
        self.assertIn("interrupted", out.changes["error"])

    def test_every_outcome_is_a_legal_move(self):
        for how in (jr.ENDED_OK, jr.ENDED_ERROR, jr.ENDED_PERMANENT, jr.ENDED_SHUTDOWN,
                    jr.ENDED_INTERRUPTED):
            for attempts in (1, 4):
                out = jr.attempt_outcome(self.running(attempts=attempts),
                                         jr.Ending(how, 1, "e"), NOW, 60.0)
                events = jr.TRANSITIONS[(jr.RUNNING, out.state)]
                self.assertIn(out.event or events[0], events)


class NoTestSwitchTest(unittest.TestCase):
    def test_the_product_reads_no_test_switch(self):
        with open(os.path.join(ROOT, "jobrunnerd.py"), encoding="utf-8") as f:
            source = f.read()
        self.assertEqual(re.findall(r"JOBRUNNER_TEST\w*|SIGUSR1", source), [])


if __name__ == "__main__":
    unittest.main()
