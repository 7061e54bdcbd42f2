"""The daemon side of visibility (issue #16, part B): `update`, `cancel`/`retry` with `where`,
per-attempt `logs`, the daemon's startup/shutdown lines, job processes named in `ps`.

- Unit tests step the JobTable with a clock: `update` (JobTable.amend) keeps every index and
  heap right and is undone exactly; a blocked job's new delay counts from its unblocking.
- `where` in steps, in process with a small BULK_STEP: how many durable steps, a disk failure
  in the second one; and for real: SIGKILL between two steps, restart, the same request again:
  every job done once.
- End to end through the socket and jobctl.
"""
import errno
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import unittest
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jobrunnerd as jr  # noqa: E402
from tests import support  # noqa: E402
from tests.test_durability import InProcessDaemonCase  # noqa: E402

TARGET = "examples.jobs:ExampleJob"
NOW = 1_000_000.0


def config(tmp, **values) -> jr.Config:
    return jr.Config(values, tmp)


####################################################################################################
#  update: JobTable.amend and validate_update, stepped with a clock
####################################################################################################


def gone_or_zombie(pid: int) -> bool:
    """The process has exited (a zombie not reaped yet counts), or is gone altogether."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return True                     # gone (also between a look and the read)

class UpdateTableTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="jr-upd-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.now = NOW
        self.cfg = config(self.tmp, workers=1, queues={"emails": {"workers": 1}})
        self.table = self.make_table()

    def clock(self):
        return self.now

    def make_table(self) -> jr.JobTable:
        return support.job_table(self, self.tmp, self.cfg, self.clock)

    def add(self, queue="default", **fields):
        fields = dict(dict(target=TARGET, queue=queue, run_at=self.now, retries=0, priority=0),
                      **fields)
        return self.table.create(self.now, [fields])[0]

    def update(self, job, **req):
        changes = jr.validate_update(req, self.cfg, self.now, job.state == jr.BLOCKED)
        self.table.amend(job, changes)

    def view(self):
        """Everything an update may touch: counts, per queue counts, list indexes, heaps (as
        the order jobs would start in), the stored records."""
        t = self.table
        queues = {name: {k: v for k, v in q.counts.items() if v}
                  for name, q in t.scheduler.queues.items()}
        heaps = {name: sorted((e[:2] for e in q.ready + q.delayed
                               if t.jobs[e[1]].token == e[2]))
                 for name, q in t.scheduler.queues.items()}
        return (dict(t.counts), queues, {k: list(v) for k, v in t.by_queue.items()},
                {s: set(v) for s, v in t.by_state.items()}, heaps,
                {i: j.stored() for i, j in t.jobs.items()})

    def test_priority_reorders_the_queue(self):
        a, b, c = self.add(), self.add(), self.add()
        self.update(c, priority=5)
        self.update(a, priority=-1)
        self.assertEqual([self.table.pop_due(self.now).id for _ in range(3)], [c.id, b.id, a.id])

    def test_queue_moves_counts_list_index_and_heap(self):
        a, b = self.add(), self.add()
        self.update(a, queue="emails")
        t = self.table
        self.assertEqual(t.by_queue, {"default": [b.id], "emails": [a.id]})
        self.assertEqual(t.scheduler.queue("emails").counts["pending"], 1)
        self.assertEqual(t.scheduler.queue("default").counts["pending"], 1)
        self.assertEqual([j.id for j in t.select(None, None, 0, 10, queue="emails")], [a.id])
        self.assertIs(t.scheduler.queue("emails").pop_due(self.now, t.jobs), a)
        self.assertIs(t.scheduler.queue("default").pop_due(self.now, t.jobs), b)
        t.requeue(a)
        t.requeue(b)
        self.update(b, queue="emails")
        self.assertEqual(t.by_queue, {"emails": [a.id, b.id]})

    def test_delay_and_run_at_of_a_pending_job_count_from_now(self):
        a = self.add()
        self.update(a, delay=30)
        self.assertEqual((a.run_at, a.delay), (NOW + 30, None))
        self.assertFalse(self.table.has_due(NOW + 29))
        self.assertTrue(self.table.has_due(NOW + 30))
        self.update(a, run_at=NOW + 5)
        self.assertEqual(a.run_at, NOW + 5)
        self.assertEqual(self.table.next_run_at(), NOW + 5)

    def test_a_blocked_jobs_delay_counts_from_its_unblocking(self):
        parent = self.add()
        child = self.add(after=[parent.id])
        self.assertEqual(child.state, jr.BLOCKED)
        self.update(child, delay=30)
        self.now += 100                                 # the parent ends much later
        self.table.transition(parent, jr.RUNNING)
        self.table.transition(parent, jr.SUCCEEDED)
        self.assertEqual((child.state, child.run_at), (jr.PENDING, NOW + 100 + 30))
        # An explicit run_at holds as it is when it is later than the unblocking.
        parent2 = self.add()
        child2 = self.add(after=[parent2.id])
        self.update(child2, run_at=NOW + 500)
        self.table.transition(parent2, jr.CANCELLED)    # (fails the parent: child2 cancelled)
        self.assertEqual(child2.state, jr.CANCELLED)
        parent3 = self.add()
        child3 = self.add(after=[parent3.id], on_parent_failure="run")
        self.update(child3, run_at=NOW + 500)
        self.table.transition(parent3, jr.CANCELLED)
        self.assertEqual((child3.state, child3.run_at), (jr.PENDING, NOW + 500))

    def test_survives_a_reload_from_the_journal(self):
        a = self.add()
        self.update(a, queue="emails", priority=7, delay=60)
        self.table.store.commit()
        again = self.make_table()
        got = again.jobs[a.id]
        self.assertEqual((got.queue, got.priority, got.run_at), ("emails", 7, NOW + 60))
        self.assertEqual(again.by_queue, {"emails": [a.id]})

    def test_undo_puts_every_index_and_heap_back(self):
        a, b = self.add(), self.add(priority=3)
        parent = self.add()
        c = self.add(after=[parent.id], key="k")
        self.table.store.commit()
        before = self.view()
        self.table.track()
        self.update(a, queue="emails", priority=9, delay=10)
        self.update(b, run_at=NOW + 50)
        self.update(c, queue="emails", delay=5)
        self.update(a, queue="default")                  # twice in one pass
        self.table.undo()
        self.table.store.discard()
        self.assertEqual(self.view(), before)
        self.assertEqual(self.table.keys, {"k": c.id})
        self.assertEqual([self.table.pop_due(self.now).id for _ in range(3)],
                         [b.id, a.id, parent.id])

    def test_cancel_many_and_retry_many_cascade_like_one_by_one_and_undo(self):
        parent, other = self.add(), self.add(key="k")
        child = self.add(after=[parent.id])
        grandchild = self.add(after=[child.id])
        self.table.transition(other, jr.RUNNING)
        self.table.store.commit()
        before = self.view()
        mark = self.table.log.mark()
        self.table.track()
        self.table.cancel_many([parent, other], uid=7)
        self.assertEqual([j.state for j in (parent, other, child, grandchild)],
                         ["cancelled"] * 4)
        self.assertEqual((child.error, child.cancelled_by), ("parent %d cancelled" % parent.id,
                                                             parent.id))
        self.table.undo()
        self.table.store.discard()
        self.table.log.rewind(mark)
        self.assertEqual(self.view(), before)
        self.table.cancel_many([parent, other], uid=7)
        self.table.store.commit()
        dup = self.add(key="k")                 # holds other's key now: other stays cancelled
        self.table.retry_many([parent, other], uid=7)
        self.assertEqual([j.state for j in (parent, other, child, grandchild)],
                         ["pending", "cancelled", "blocked", "blocked"])
        self.assertEqual((parent.attempts, parent.error, parent.finished_at), (0, None, None))
        self.assertEqual(self.table.keys["k"], dup.id)
        self.table.log.flush()
        with open(os.path.join(self.tmp, "logs", "background_jobs.log")) as f:
            lines = [support.parse_log_line(line) for line in f]
        cancelled = [e for e in lines if e["event"] == "cancelled" and e.get("uid") == "7"]
        self.assertEqual(sorted(e["job"] for e in cancelled), [str(parent.id), str(other.id)])
        self.assertIn("attempt", cancelled[0])
        self.table.store.commit()
        again = self.make_table()               # as journaled
        self.assertEqual({i: j.stored() for i, j in again.jobs.items()},
                         {i: j.stored() for i, j in self.table.jobs.items()})

    def test_validate_update_refuses_bad_requests(self):
        cases = [({}, "bad_request"), ({"delay": 1, "run_at": NOW}, "bad_request"),
                 ({"priority": "high"}, "bad_request"), ({"priority": 2 ** 40}, "bad_request"),
                 ({"delay": -1}, "bad_request"), ({"queue": "a b"}, "bad_request"),
                 ({"queue": "emials"}, "not_found")]
        for req, code in cases:
            with self.subTest(req=req):
                with self.assertRaises(jr.ProtocolError) as caught:
                    jr.validate_update(req, self.cfg, NOW, False)
                self.assertEqual(caught.exception.code, code)
        self.assertEqual(jr.validate_update({"queue": "default"}, self.cfg, NOW, False),
                         {"queue": "default"})


####################################################################################################
#  where: steps, in process
####################################################################################################

class WhereStepsTest(InProcessDaemonCase):
    def add_many(self, n, target=TARGET, **fields):
        reply = self.call(op="add_batch", jobs=[dict(target=target, **fields)] * n)
        self.assertTrue(reply["ok"], reply)
        return reply["ids"]

    def steps(self):
        """Record the size of each step (Protocol.cancel_many/retry_many calls)."""
        sizes = []
        for name in ("cancel_many", "retry_many"):
            real = getattr(self.d.protocol, name)

            def recording(jobs, uid, real=real):
                sizes.append(len(jobs))
                return real(jobs, uid)
            patcher = mock.patch.object(self.d.protocol, name, recording)
            patcher.start()
            self.addCleanup(patcher.stop)
        return sizes

    def test_at_most_one_step_is_one_durable_change_more_are_steps(self):
        self.assertTrue(self.call(op="pause")["ok"])
        ids = self.add_many(8)
        other = self.add_many(2, target="examples.jobs:DelayedJob")
        sizes = self.steps()
        with mock.patch.object(jr, "BULK_STEP", 8):
            reply = self.call(op="cancel", where={"state": "pending", "target": "*:Example*"})
        self.assertEqual(reply, {"ok": True, "ids": ids})
        self.assertEqual(sizes, [8])
        ids = self.add_many(7)
        sizes.clear()
        with mock.patch.object(jr, "BULK_STEP", 3):
            reply = self.call(op="cancel", where={"target": "examples.jobs:ExampleJob"})
        self.assertEqual(reply, {"ok": True, "ids": ids})
        self.assertEqual(sizes, [3, 3, 1])
        self.assertEqual({self.d.jobs.jobs[i].state for i in other}, {"pending"})
        sizes.clear()
        with mock.patch.object(jr, "BULK_STEP", 4):
            reply = self.call(op="retry", where={"state": "cancelled"})
        self.assertEqual(reply["ids"], sorted(reply["ids"]))
        self.assertEqual(len(reply["ids"]), 15)
        self.assertEqual(sizes, [4, 4, 4, 3])

    def test_more_than_one_step_goes_in_slices(self):
        # Over BULK_STEP in all: steps of BULK_SLICE (each holds the loop less); at most
        # BULK_STEP in all is still one durable change, whatever BULK_SLICE is.
        self.assertTrue(self.call(op="pause")["ok"])
        ids = self.add_many(11)
        sizes = self.steps()
        with mock.patch.object(jr, "BULK_STEP", 5), mock.patch.object(jr, "BULK_SLICE", 2):
            reply = self.call(op="cancel", where={"state": "pending"})
            self.assertEqual(reply, {"ok": True, "ids": ids})
            self.assertEqual(sizes, [2, 2, 2, 2, 2, 1])
            sizes.clear()
            reply = self.call(op="retry", where={"target": "examples.jobs:ExampleJob",
                                                  "state": "cancelled"})
            self.assertEqual(reply["ids"], ids)
            self.assertEqual(sizes, [2, 2, 2, 2, 2, 1])
            sizes.clear()
            five = ids[:5]
            for job_id in ids[5:]:
                self.call(op="cancel", id=job_id)
            reply = self.call(op="cancel", where={"state": "pending"})
            self.assertEqual(reply, {"ok": True, "ids": five})
            self.assertEqual(sizes, [5], "five in all: one durable change")

    def test_a_failed_write_in_a_later_step_keeps_the_earlier_steps(self):
        self.assertTrue(self.call(op="pause")["ok"])
        ids = self.add_many(7)
        real, calls = self.d.store.commit, []

        def commit(sync=True):
            calls.append(sync)
            if len(calls) == 2:                 # the second step's write
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(sync)
        with mock.patch.object(jr, "BULK_STEP", 3), \
                mock.patch.object(self.d.store, "commit", commit):
            reply = self.call(op="cancel", where={"state": "pending"})
        self.assertEqual(reply["error"]["code"], "io_error")
        self.assertIn("after 3 jobs", reply["error"]["message"])
        states = [self.d.jobs.jobs[i].state for i in ids]
        self.assertEqual(states, ["cancelled"] * 3 + ["pending"] * 4)
        self.assertEqual(self.call(op="cancel", where={"state": "pending"})["ids"], ids[3:])

    def test_bad_where_is_refused(self):
        cases = [({"where": {}}, "bad_request"), ({"where": []}, "bad_request"),
                 ({"where": {"stat": "pending"}}, "bad_request"),
                 ({"where": {"state": "succeeded"}}, "bad_request"),
                 ({"where": {"target": "x" * 1025}}, "bad_request"),
                 ({"where": {"queue": "a b"}}, "bad_request"),
                 ({"where": {"state": "pending"}, "id": 1}, "bad_request")]
        for req, code in cases:
            with self.subTest(req=req):
                self.assertEqual(self.call(op="cancel", **req)["error"]["code"], code)
        self.assertEqual(self.call(op="retry", where={"state": "pending"})["error"]["code"],
                         "bad_request")
        self.assertEqual(self.call(op="cancel", where={"queue": "nope"}), {"ok": True, "ids": []})


####################################################################################################
#  where: a crash between steps, for real
####################################################################################################

# The daemon with steps of 5 jobs, killed (SIGKILL) right after its second step is durable
# (and its log lines written).
CRASH_AFTER_TWO_STEPS = support.kill_after_commit(
    "jr.BULK_STEP = 5", "any(task.durable >= 10 for task in self.protocol.bulk)")


class WhereCrashTest(support.DaemonTestCase):
    daemon_preamble = CRASH_AFTER_TWO_STEPS

    def test_a_crash_between_steps_leaves_a_prefix_the_same_request_completes(self):
        d = self.daemon
        self.assertTrue(d.call(op="pause")["ok"])
        reply = d.call(op="add_batch", jobs=[{"target": TARGET}] * 23
                       + [{"target": "examples.jobs:DelayedJob"}] * 3)
        ids, others = reply["ids"][:23], reply["ids"][23:]
        request = {"op": "cancel", "where": {"state": "pending", "target": "*:ExampleJob"}}
        with d.raw() as c:
            c.send(**request)
            with self.assertRaises((ConnectionError, OSError)):
                c.recv()                        # killed before its reply
        d.proc.wait(10)
        self.assertEqual(d.proc.returncode, -signal.SIGKILL)
        d.stderr.close()
        d.preamble = None
        d.start()
        states = [d.get(i)["state"] for i in ids]
        self.assertEqual(states, ["cancelled"] * 10 + ["pending"] * 13)     # a prefix: 2 steps
        reply = d.call(**request)
        self.assertEqual(reply, {"ok": True, "ids": ids[10:]})
        self.assertEqual({d.get(i)["state"] for i in ids}, {"cancelled"})
        self.assertEqual({d.get(i)["state"] for i in others}, {"pending"})
        cancelled = [e["job"] for e in d.events() if e["event"] == "cancelled"]
        self.assertEqual(sorted(cancelled, key=int), [str(i) for i in ids])  # each once


####################################################################################################
#  update, cancel and retry with where: end to end through the socket and jobctl
####################################################################################################

class UpdateAndWhereEndToEnd(support.DaemonTestCase):
    config = {"queues": {"emails": {"workers": 1}}}

    def test_update_through_the_socket(self):
        d = self.daemon
        self.assertTrue(d.call(op="pause")["ok"])
        job_id = d.add(priority=1)
        reply = d.call(op="update", id=job_id, priority=4, queue="emails", delay=60)
        self.assertTrue(reply["ok"], reply)
        job = reply["job"]
        self.assertEqual((job["priority"], job["queue"], job["state"]), (4, "emails", "pending"))
        self.assertAlmostEqual(job["run_at"], time.time() + 60, delta=10)
        self.assertEqual(d.get(job_id), job)
        queues = {q["name"]: q["counts"]["pending"] for q in d.call(op="queues")["queues"]}
        self.assertEqual(queues, {"default": 0, "emails": 1})
        for req, code in (({"id": job_id, "queue": "emials"}, "not_found"),
                          ({"id": 999, "priority": 1}, "not_found"),
                          ({"id": job_id}, "bad_request"),
                          ({"id": job_id, "priority": 1, "prio": 2}, "bad_request")):
            self.assertEqual(d.call(op="update", **req)["error"]["code"], code, req)
        self.assertTrue(d.call(op="resume")["ok"])
        done = d.add(queue="emails")
        d.wait_job(done)
        reply = d.call(op="update", id=done, priority=2)
        self.assertEqual(reply["error"]["code"], "invalid_state")
        running = d.add("examples.jobs:DelayedJob", args=[30])
        d.wait_state(running, "running")
        self.assertEqual(d.call(op="update", id=running, priority=2)["error"]["code"],
                         "invalid_state")
        d.call(op="cancel", id=running)
        # Kept across a restart (journal), then across a graceful stop (snapshot).
        d.kill()
        d.start()
        self.assertEqual(d.get(job_id)["queue"], "emails")

    def test_jobctl_update_cancel_and_retry_by_filters(self):
        d = self.daemon
        self.assertTrue(d.call(op="pause")["ok"])
        mail = [d.add(queue="emails") for _ in range(3)]
        plain = [d.add() for _ in range(2)]
        out = d.jobctl("update", str(plain[0]), "--priority", "3", "--queue", "emails")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(d.get(plain[0])["queue"], "emails")
        out = d.jobctl("--json", "update", str(plain[0]), "--delay", "120")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertGreater(json.loads(out.stdout)["job"]["run_at"], time.time() + 60)
        out = d.jobctl("update", str(plain[1]), "--queue", "nope")
        self.assertEqual((out.returncode, out.stdout), (2, ""))
        self.assertIn("nope", out.stderr)
        out = d.jobctl("cancel", "--state", "pending", "--queue", "emails")
        self.assertEqual(out.returncode, 0, out.stderr)
        moved = sorted(mail + [plain[0]])
        self.assertEqual(out.stdout, "4 jobs cancelled: %s\n" % " ".join(map(str, moved)))
        out = d.jobctl("--json", "retry", "--target", "examples.*", "--queue", "emails")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(json.loads(out.stdout), {"ok": True, "ids": moved})
        out = d.jobctl("--json", "cancel", "--state", "succeeded")
        self.assertEqual(out.returncode, 2)
        out = d.jobctl("cancel", "--schedule", "nightly")      # no job of that schedule
        self.assertEqual((out.returncode, out.stdout), (0, "0 jobs cancelled\n"))
        out = d.jobctl("cancel", str(plain[1]))                 # by id, as before
        self.assertEqual((out.returncode, out.stdout), (0, "%d cancelled\n" % plain[1]))
        out = d.jobctl("cancel", "--state", "pending")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertTrue(d.call(op="resume")["ok"])
        running = d.add("examples.jobs:DelayedJob", args=[60])
        pid = d.wait_state(running, "running")["pid"]
        out = d.jobctl("cancel", "--state", "running", "--target", "*:DelayedJob")
        self.assertEqual((out.returncode, out.stdout), (0, "1 job cancelled: %d\n" % running))
        support.wait_until(lambda: gone_or_zombie(pid),
                           message="the cancelled attempt's process to end")


####################################################################################################
#  logs: each attempt's header, output and end (with the traceback or exit reason)
####################################################################################################

LOG_JOBS = """
import os, signal, sys, time

def boom(marker):
    print("working")
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise ValueError("bad thing")
    print("fine now", end="")           # no line end: the daemon's end line starts its own

def code3():
    print("bye")
    sys.exit(3)

def killed():
    os.kill(os.getpid(), signal.SIGKILL)

def sleepy():
    time.sleep(60)

def chatty(n):
    sys.stdout.write("x" * n)
    sys.stdout.flush()
    raise RuntimeError("after a lot of output")

def wait_for(path):
    print("before", flush=True)
    while not os.path.exists(path):
        time.sleep(0.02)
    print("after")
"""

HEADER = r"\[jobrunner\] attempt (\d+)/(\d+) started (\d{4}-\d\d-\d\dT[\d:.]+Z) pid (\d+)"


class LogsEndToEnd(support.DaemonTestCase):
    config = {"allow": ["examples.*:*", "vjobs:*"], "max_output_bytes": 4096}

    def prepare(self):
        self.write_job_module("vjobs", LOG_JOBS)

    def logs(self, job_id, *args):
        out = self.daemon.jobctl("logs", str(job_id), *args)
        self.assertEqual(out.returncode, 0, out.stderr)
        return out.stdout

    def started_pids(self, job_id):
        return [e["pid"] for e in self.daemon.job_events(job_id, "started")]

    def test_each_attempt_has_a_header_its_output_and_how_it_ended(self):
        d = self.daemon
        marker = os.path.join(self.root, "marker")
        job_id = d.add("vjobs:boom", args=[marker], retries=2, retry_delay=0.05)
        self.assertEqual(d.wait_job(job_id)["state"], "succeeded")
        text = self.logs(job_id)
        lines = text.splitlines()
        import re
        headers = [re.fullmatch(HEADER, line) for line in lines if line.startswith("[jobrunner] "
                                                                                    "attempt") and
                   " started " in line]
        self.assertEqual([(h[1], h[2]) for h in headers], [("1", "3"), ("2", "3")])
        self.assertEqual([h[4] for h in headers], self.started_pids(job_id))
        first_end = lines.index(next(l for l in lines if "attempt 1/3 failed" in l))
        self.assertEqual(lines[1], "working")
        self.assertRegex(lines[first_end], r"attempt 1/3 failed after [\d.]+s: ValueError: bad "
                         r"thing; next attempt at \d{4}-")
        self.assertIn("    Traceback (most recent call last):", lines[first_end + 1:])
        self.assertIn('        raise ValueError("bad thing")', lines)
        self.assertEqual(lines[-2:], ["fine now", lines[-1]])
        self.assertRegex(lines[-1], r"^\[jobrunner\] attempt 2/3 succeeded after [\d.]+s$")
        # The same through the output op, which anyone who may use the socket reads.
        self.assertEqual(d.call(op="output", id=job_id)["data"], text)

    def test_a_silent_success_adds_lines_only_to_a_file_earlier_attempts_made(self):
        d = self.daemon
        quiet = d.add("examples.jobs:add", args=[1, 2])
        self.assertEqual(d.wait_job(quiet)["state"], "succeeded")
        self.assertEqual(d.call(op="output", id=quiet)["data"], "")
        self.assertFalse(os.path.exists(os.path.join(d.log_dir, "output", "%d.log" % quiet)))
        self.write_job_module("vjobs2", "import os\ndef once(marker):\n    if not os.path"
                              ".exists(marker):\n        open(marker, 'w').close()\n"
                              "        os._exit(3)\n")
        d.stop()                                            # (the allow list is read at start)
        d.config["allow"] = ["examples.*:*", "vjobs*:*"]
        d.start()
        job_id = d.add("vjobs2:once", args=[os.path.join(self.root, "m")], retries=1,
                       retry_delay=0.05)
        self.assertEqual(d.wait_job(job_id)["state"], "succeeded")
        lines = self.logs(job_id).splitlines()
        self.assertEqual(len(lines), 4, lines)
        self.assertRegex(lines[0], HEADER)
        self.assertRegex(lines[1], r"attempt 1/2 failed after .*: exited with code 3; next ")
        self.assertRegex(lines[2], HEADER)
        self.assertRegex(lines[3], r"^\[jobrunner\] attempt 2/2 succeeded after [\d.]+s$")

    def test_exit_reasons(self):
        d = self.daemon
        cases = {d.add("vjobs:code3"): "exited with code 3; no retries left",
                 d.add("vjobs:killed"): "killed by signal SIGKILL; no retries left",
                 d.add("vjobs:sleepy", timeout=0.5): "timed out after 0.5s; no retries left"}
        for job_id, reason in cases.items():
            self.assertEqual(d.wait_job(job_id)["state"], "failed")
            text = self.logs(job_id)
            self.assertRegex(text.splitlines()[0], HEADER)
            self.assertRegex(text.splitlines()[-1], r"^\[jobrunner\] attempt 1/1 failed after "
                             r"[\d.]+s: " + re.escape(reason) + "$")
        self.assertIn("\nbye\n", self.logs(next(iter(cases))))
        running = d.add("vjobs:sleepy")
        d.wait_state(running, "running")
        d.call(op="cancel", id=running)
        support.wait_until(lambda: "cancelled after" in self.logs(running),
                           message="the cancelled attempt's end line")
        self.assertRegex(self.logs(running).splitlines()[-1],
                         r"attempt 1/1 cancelled after [\d.]+s \(killed by signal SIG(TERM|KILL)\)")

    def test_the_output_cap_holds_and_the_end_line_still_comes(self):
        d = self.daemon
        job_id = d.add("vjobs:chatty", args=[20000])
        self.assertEqual(d.wait_job(job_id)["state"], "failed")
        path = os.path.join(d.log_dir, "output", "%d.log" % job_id)
        size = os.path.getsize(path)
        self.assertLessEqual(size, 4096 + jr.OUTPUT_NOTES_RESERVE)
        text = self.logs(job_id)
        self.assertIn("[jobrunner: output truncated: max_output_bytes=4096 reached]", text)
        lines = text.splitlines()
        end = [i for i, line in enumerate(lines) if line.startswith("[jobrunner] attempt 1/1 "
                                                                     "failed after")]
        self.assertEqual(len(end), 1, lines[-8:])
        self.assertEqual(lines[end[0] + 1], "    Traceback (most recent call last):")
        self.assertEqual(lines[-1], "    RuntimeError: after a lot of output")
        self.assertLess(text.index("x" * 100), text.index("output truncated"))

    def test_follow_shows_the_header_the_output_and_the_end(self):
        import subprocess
        d = self.daemon
        go = os.path.join(self.root, "go")
        job_id = d.add("vjobs:wait_for", args=[go])
        follow = subprocess.Popen([sys.executable, support.JOBCTL, "--socket", d.socket, "logs",
                                   str(job_id), "--follow"], stdout=subprocess.PIPE, text=True)
        self.addCleanup(follow.kill)
        first = follow.stdout.readline()
        self.assertRegex(first, HEADER)
        self.assertEqual(follow.stdout.readline(), "before\n")
        open(go, "w").close()
        rest = follow.stdout.read()
        follow.stdout.close()
        self.assertEqual(follow.wait(30), 0)
        self.assertRegex(rest, r"^after\n\[jobrunner\] attempt 1/1 succeeded after [\d.]+s\n$")


####################################################################################################
#  startup and shutdown lines on the daemon's stderr
####################################################################################################

STARTUP = r"(?m)^jobrunnerd: startup version=(\S+) pid=(\d+) socket=(\S+) workers=2 state_dir=\S+$"


class StartupShutdownTest(support.DaemonTestCase):
    def stderr_lines(self, word):
        return [line for line in self.daemon.read_stderr().splitlines()
                if line.startswith("jobrunnerd: " + word + " ")]

    def test_startup_then_the_signal_that_stopped_it(self):
        d = self.daemon
        found = re.search(STARTUP, d.read_stderr())
        self.assertIsNotNone(found, d.read_stderr())
        self.assertEqual(found.groups(), (jr.VERSION, str(d.proc.pid), d.socket))
        for sig in (signal.SIGTERM, signal.SIGINT):
            pid = d.proc.pid
            self.assertEqual(d.stop(sig), 0)
            self.assertRegex(self.stderr_lines("shutdown")[-1],
                             r"^jobrunnerd: shutdown reason=%s pid=%d uptime=[\d.]+s$"
                             % (sig.name, pid))
            self.assertEqual(d.events()[-1]["event"], "shutdown")
            self.assertEqual(d.events()[-1]["reason"], sig.name)
            d.start()
        self.assertEqual(len(self.stderr_lines("startup")), 3)

    def test_a_daemon_that_cannot_start_says_why_it_stops(self):
        d = self.daemon
        second = support.Daemon(self.root)          # the same state: its lock is held
        second.config = dict(d.config, socket=os.path.join(self.root, "second.sock"))
        second.stderr_path = os.path.join(self.root, "second.stderr")
        second.start(wait=False)
        self.assertEqual(second.proc.wait(30), 1)
        second.stderr.close()
        err = second.read_stderr()
        self.assertRegex(err, r"(?m)^jobrunnerd: shutdown reason=\"error: .+\" pid=\d+$")
        self.assertNotIn("startup", err)


####################################################################################################
#  job processes named in ps and top
####################################################################################################

NAMED_JOBS = """
import os, time

def fork_and_sleep(path):
    pid = os.fork()                     # a fork without exec: it shows the attempt's name too
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    with open(path, "w") as f:
        f.write(str(pid))
    time.sleep(60)
"""


class NamedProcessesZygote(support.DaemonTestCase):
    config = {"allow": ["examples.*:*", "njobs:*"], "start_method": "zygote"}

    def prepare(self):
        self.write_job_module("njobs", NAMED_JOBS)

    @staticmethod
    def read(path):
        with open(path, "rb") as f:
            return f.read()

    def test_job_processes_carry_their_job_and_attempt(self):
        d = self.daemon
        path = os.path.join(self.root, "forked")
        job_id = d.add("njobs:fork_and_sleep", args=[path], retries=2)
        pid = d.wait_state(job_id, "running")["pid"]
        forked = int(support.wait_until(lambda: os.path.exists(path) and self.read(path)))
        title = b"jobrunner: job %d attempt 1/3 njobs:fork_and_sleep" % job_id
        for proc in (pid, forked):
            cmdline = self.read("/proc/%d/cmdline" % proc)
            self.assertEqual(cmdline.split(b"\0")[:4],
                             [title, b"jobrunner-job", b"%d" % job_id, b"1"])
            self.assertEqual(self.read("/proc/%d/comm" % proc), b"job %d 1/3\n" % job_id)
            self.assertEqual(jr.argv_mark(proc), (job_id, 1))     # what containment reads
        if d.config["start_method"] == "zygote":
            zygotes = support.children_named(d.proc.pid, b"jobrunner-zygote")
            self.assertEqual(len(zygotes), 1)
            self.assertNotIn(b"jobrunner: job", self.read("/proc/%d/cmdline" % zygotes[0]))
        d.call(op="cancel", id=job_id)
        support.wait_until(lambda: self.gone_or_zombie(forked),
                           message="the forked process to be killed")

    def gone_or_zombie(self, pid):
        return gone_or_zombie(pid)


class NamedProcessesSpawn(NamedProcessesZygote):
    config = dict(NamedProcessesZygote.config, start_method="spawn")


if __name__ == "__main__":
    unittest.main()
