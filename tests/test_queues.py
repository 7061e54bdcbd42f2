"""Named queues (issue #14, SPEC §2a): each queue has its own slots, pause and defaults.

- Unit tests step the Scheduler and the JobTable with `now`/a clock: a free slot in one queue
  never waits on another; priority and FIFO hold within a queue; pauses per queue and of the
  whole daemon; set_workers lower and higher; a queue the config no longer declares; counts and
  the list index per queue, kept by undo() too.
- The config: [queues.NAME] tables, each bad key or value named.
- The store: format 2, a format-1 state directory (tests/fixtures/state-format1, written by the
  code before queues) loads, and a newer format stops start-up without touching the file.
- End to end through the socket and jobctl: unknown queue, `queues`, `workers`, pause --queue
  across a SIGKILL, SIGHUP adding and removing a queue, a slow queue never holding up another.
"""
import errno
import json
import os
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
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "state-format1")


def job(job_id, queue="default", priority=0, run_at=NOW) -> jr.Job:
    return jr.Job(id=job_id, target=TARGET, state=jr.PENDING, priority=priority, run_at=run_at,
                  attempts=0, retries=0, retry_delay=1.0, backoff="fixed", queue=queue)


def config(tmp, **values) -> jr.Config:
    return jr.Config(values, tmp)


class SchedulerQueuesTest(unittest.TestCase):
    def scheduler(self, *jobs, workers=1, queues=None) -> jr.Scheduler:
        tmp = tempfile.mkdtemp(prefix="jr-q-")
        self.addCleanup(shutil.rmtree, tmp)
        s = jr.Scheduler(workers)
        s.configure(config(tmp, workers=workers, queues=queues or {}))
        s.jobs = {j.id: j for j in jobs}
        for j in jobs:
            s.add(j, NOW)
        return s

    def start(self, s: jr.Scheduler, now=NOW):
        """What the Dispatcher does with a job it starts: the slot of its queue is taken."""
        j = s.next_job(now)
        if j is not None:
            s.queue(j.queue).running += 1
        return j

    def test_a_free_slot_in_one_queue_never_waits_on_another(self):
        busy = [job(i, "reports", priority=100) for i in range(1, 6)]
        mail = job(6, "emails", priority=-5)
        s = self.scheduler(*busy, mail, queues={"reports": {"workers": 1},
                                                "emails": {"workers": 2}})
        self.assertEqual(self.start(s).id, 1)           # reports' best
        self.assertIs(self.start(s), mail, "emails has a free slot: its job starts at once")
        self.assertIsNone(self.start(s), "reports is full, emails empty: nothing starts")
        self.assertEqual(s.due_in(NOW), None, "the full queue's due jobs do not wake the loop")
        s.queue("reports").running -= 1                 # its attempt ended
        self.assertEqual(s.due_in(NOW), 0.0)
        self.assertEqual(self.start(s).id, 2)

    def test_priority_then_fifo_within_each_queue(self):
        jobs = [job(1, "a"), job(2, "b", priority=1), job(3, "a", priority=9), job(4, "b"),
                job(5, "a", priority=9), job(6, "b", priority=1)]
        s = self.scheduler(*jobs, workers=1, queues={"a": {"workers": 9}, "b": {"workers": 9}})
        order = []
        while (j := self.start(s)) is not None:
            order.append((j.queue, j.id))
        self.assertEqual([i for q, i in order if q == "a"], [3, 5, 1])
        self.assertEqual([i for q, i in order if q == "b"], [2, 6, 4])

    def test_a_queue_pause_stops_that_queue_and_the_daemon_pause_stops_all(self):
        s = self.scheduler(job(1), job(2, "a"), job(3, "a"), workers=2,
                           queues={"a": {"workers": 2}})
        s.queue("a").paused = True
        self.assertEqual(self.start(s).id, 1)
        self.assertIsNone(self.start(s), "a is paused")
        s.queue("a").paused = False
        s.paused = True
        self.assertIsNone(self.start(s), "the whole daemon is paused")
        self.assertIsNone(s.due_in(NOW))
        s.paused = False
        self.assertEqual(self.start(s).id, 2)

    def test_set_workers_lower_then_higher(self):
        s = self.scheduler(*(job(i, "a") for i in range(1, 6)), queues={"a": {"workers": 3}})
        for expected in (1, 2, 3):
            self.assertEqual(self.start(s).id, expected)
        s.queue("a").workers = 1            # lowered: the 3 running go on, none starts
        self.assertIsNone(self.start(s))
        s.queue("a").running = 1            # two ended: still at the new limit
        self.assertIsNone(self.start(s))
        s.queue("a").workers = 3            # raised: two more start
        self.assertEqual([self.start(s).id, self.start(s).id], [4, 5])

    def test_an_undeclared_queue_keeps_its_jobs_and_starts_none(self):
        tmp = tempfile.mkdtemp(prefix="jr-q-")
        self.addCleanup(shutil.rmtree, tmp)
        s = self.scheduler(job(1, "old"), queues={"old": {"workers": 2}})
        s.configure(config(tmp, workers=1, queues={}))       # SIGHUP: gone from the config
        self.assertFalse(s.queue("old").declared)
        self.assertIsNone(self.start(s))
        self.assertIsNone(s.due_in(NOW))
        s.configure(config(tmp, workers=1, queues={"old": {"workers": 1}}))
        self.assertEqual(self.start(s).id, 1)

    def test_configure_applies_the_config_again_and_keeps_pauses(self):
        tmp = tempfile.mkdtemp(prefix="jr-q-")
        self.addCleanup(shutil.rmtree, tmp)
        s = self.scheduler(queues={"a": {"workers": 4}})
        s.queue("a").workers, s.queue("a").paused, s.default.workers = 0, True, 9
        s.configure(config(tmp, workers=1, queues={"a": {"workers": 4}}))
        self.assertEqual((s.queue("a").workers, s.queue("a").paused, s.default.workers),
                         (4, True, 1))


class TableQueuesTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="jr-q-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.now = NOW
        self.table = self.make_table()

    def clock(self):
        return self.now

    def make_table(self, name="t", cfg_queues=None) -> jr.JobTable:
        return support.job_table(self, os.path.join(self.tmp, name), config(
            self.tmp, workers=1, queues=cfg_queues or {"emails": {"workers": 2},
                                                       "reports": {"workers": 1}}), self.clock)

    def add(self, queue="default", **fields):
        fields = dict(target=TARGET, queue=queue, run_at=self.now, retries=0, priority=0, **fields)
        return self.table.create(self.now, [fields])[0]

    def counts(self, queue):
        return {k: v for k, v in self.table.scheduler.queue(queue).counts.items() if v}

    def test_counts_per_state_per_queue_follow_every_change(self):
        a, b, c = self.add("emails"), self.add("emails"), self.add("reports")
        self.add()
        self.assertEqual(self.counts("emails"), {"pending": 2})
        self.table.transition(a, jr.RUNNING)
        self.table.transition(a, jr.SUCCEEDED)
        self.table.transition(b, jr.CANCELLED)
        self.assertEqual(self.counts("emails"), {"succeeded": 1, "cancelled": 1})
        self.assertEqual(self.counts("reports"), {"pending": 1})
        self.assertEqual(self.counts("default"), {"pending": 1})
        self.table.remove([a])
        self.assertEqual(self.counts("emails"), {"cancelled": 1})
        self.assertEqual(c.queue, "reports")

    def test_undo_puts_back_counts_list_index_and_queue_pauses(self):
        keep = self.add("emails")
        self.table.transition(keep, jr.RUNNING)
        self.table.transition(keep, jr.SUCCEEDED)
        self.table.store.commit()
        before = (self.counts("emails"), dict(self.table.by_queue), self.table.paused)
        self.table.track()
        self.add("emails")
        self.add("reports")
        self.table.remove([keep])
        self.table.set_paused(True, "emails")
        self.table.set_paused(True)
        self.table.undo()
        self.table.store.discard()
        self.assertEqual((self.counts("emails"), dict(self.table.by_queue), self.table.paused),
                         before)
        self.assertFalse(self.table.scheduler.queue("emails").paused)
        self.assertEqual(self.counts("reports"), {})

    def test_list_by_queue_reads_that_queue_in_id_order(self):
        made = [self.add(("emails", "reports", "default")[i % 3]) for i in range(30)]
        self.table.transition(made[3], jr.CANCELLED)
        got = self.table.select(None, None, 0, 100, queue="emails")
        self.assertEqual([j.id for j in got], [j.id for j in made if j.queue == "emails"])
        got = self.table.select(jr.CANCELLED, None, 0, 100, queue="emails")
        self.assertEqual([j.id for j in got], [made[3].id])
        self.assertEqual(self.table.select(None, None, made[27].id, 2, queue="emails"), [])
        got = self.table.select(None, "examples.*", 0, 5, queue="reports")
        self.assertEqual([j.id for j in got], [j.id for j in made if j.queue == "reports"][:5])
        self.assertEqual(self.table.select(None, None, 0, 5, queue="nope"), [])

    def test_queue_pause_and_queues_survive_a_fold_and_a_reload(self):
        self.add("emails")
        self.table.set_paused(True, "emails")
        self.table.set_paused(True, "gone")                 # an undeclared queue's pause
        self.table.store.commit()
        again = self.make_table()                          # from the journal
        self.assertTrue(again.scheduler.queue("emails").paused)
        self.assertTrue(again.scheduler.queue("gone").paused)
        self.assertFalse(again.scheduler.queue("gone").declared)
        self.assertEqual([j.queue for j in again.jobs.values()], ["emails"])
        again.store.close()
        meta = {"next_id": again.next_id, "paused": False, "queues": again.queue_meta()}
        store = jr.Store(os.path.join(self.tmp, "t", "state"), fsync=False)
        store.load()
        store.snapshot(meta, again.jobs)                   # as a fold writes it
        store.close()
        with open(os.path.join(self.tmp, "t", "state", "queue.json")) as f:
            head = json.loads(f.readline()[:-len(',"jobs":[\n')] + "}")
        self.assertEqual((head["format"], head["queues"]),
                         (2, {"emails": {"paused": True}, "gone": {"paused": True}}))
        third = self.make_table()
        self.assertTrue(third.scheduler.queue("emails").paused)

    def test_log_lines_carry_the_queue_unless_default(self):
        j = self.add("emails")
        d = self.add()
        self.table.transition(j, jr.RUNNING)
        self.table.transition(d, jr.RUNNING)
        self.table.log.flush()
        with open(os.path.join(self.tmp, "t", "logs", "background_jobs.log")) as f:
            lines = [support.parse_log_line(line) for line in f]
        self.assertEqual([e.get("queue") for e in lines if e["job"] == str(j.id)],
                         ["emails", "emails"])
        self.assertEqual([e.get("queue") for e in lines if e["job"] == str(d.id)], [None, None])


class ConfigQueuesTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="jr-q-")
        self.addCleanup(shutil.rmtree, self.tmp)

    def test_tables_are_checked_and_filled_in(self):
        cfg = config(self.tmp, queues={"emails": {"workers": 8, "retries": 3, "timeout": 0},
                                       "re.ports_2-x": {}})
        self.assertEqual(cfg.queues["emails"]["workers"], 8)
        self.assertEqual(cfg.queues["re.ports_2-x"],
                         {"workers": 1, "isolation": "fresh", "max_jobs_per_worker": 1000})
        self.assertEqual((cfg.isolation, cfg.max_jobs_per_worker), ("fresh", 1000))

    def test_each_bad_key_or_value_is_named(self):
        cases = [
            ({"emails": {"wrokers": 2}}, "queues.emails: unknown key(s): wrokers"),
            ({"emails": {"workers": -1}}, "queues.emails.workers"),
            ({"emails": {"workers": "2"}}, "queues.emails.workers"),
            ({"emails": {"retries": 5000}}, "queues.emails.retries"),
            ({"emails": {"backoff": "linear"}}, "queues.emails.backoff"),
            ({"emails": {"priority": 2 ** 40}}, "queues.emails.priority"),
            ({"emails": {"timeout": -1}}, "queues.emails.timeout"),
            ({"emails": {"isolation": "other"}}, "queues.emails.isolation"),
            ({"bad name!": {}}, "'bad name!'"),
            ({"x" * 65: {}}, "is not 1-64"),
            ({"emails": 3}, "queues.emails: must be a table"),
            ({"default": {"workers": 2}}, "[queues.default]"),
        ]
        for queues, needle in cases:
            with self.subTest(queues=queues):
                with self.assertRaises(jr.ConfigError) as caught:
                    config(self.tmp, queues=queues)
                self.assertIn(needle, str(caught.exception))
        with self.assertRaises(jr.ConfigError) as caught:
            config(self.tmp, isolation="fresh ")
        self.assertIn('must be "fresh" or "reuse"', str(caught.exception))

    def test_add_takes_its_queue_defaults_then_the_top_level(self):
        cfg = config(self.tmp, retries=2, timeout=60, queues={
            "emails": {"retries": 5, "backoff": "fixed", "priority": 3, "timeout": 0}})
        got = jr.validate_add({"target": TARGET, "queue": "emails"}, cfg, NOW)
        self.assertEqual((got["queue"], got["retries"], got["backoff"], got["priority"],
                          got["timeout"], got["retry_delay"]), ("emails", 5, "fixed", 3, None, 1.0))
        got = jr.validate_add({"target": TARGET, "queue": "emails", "retries": 0}, cfg, NOW)
        self.assertEqual(got["retries"], 0)
        got = jr.validate_add({"target": TARGET}, cfg, NOW)
        self.assertEqual((got["queue"], got["retries"], got["timeout"]), ("default", 2, 60.0))
        with self.assertRaises(jr.ProtocolError) as caught:
            jr.validate_add({"target": TARGET, "queue": "emials"}, cfg, NOW)
        self.assertEqual(caught.exception.code, "not_found")
        self.assertIn("emials", caught.exception.message)
        for bad in ("", "a b", 7, None, "x" * 65):
            with self.assertRaises(jr.ProtocolError) as caught:
                jr.validate_add({"target": TARGET, "queue": bad}, cfg, NOW)
            self.assertEqual(caught.exception.code, "bad_request", bad)


class StoreFormatTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="jr-q-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.state = os.path.join(self.tmp, "state")
        shutil.copytree(FIXTURE, self.state)
        os.chmod(self.state, 0o750)

    def test_a_format_1_state_directory_loads(self):
        store = jr.Store(self.state, fsync=False)
        self.addCleanup(store.close)
        meta, records = store.load(jr.Job.from_stored)
        self.assertTrue(meta["paused"])
        self.assertEqual(meta["next_id"], 7)
        states = {i: (j.state, j.queue) for i, j in records.items()}
        self.assertEqual(states, {1: ("succeeded", "default"), 2: ("failed", "default"),
                                  3: ("pending", "default"), 4: ("cancelled", "default"),
                                  5: ("pending", "default"), 6: ("pending", "default")})
        self.assertEqual((records[5].args, records[5].kwargs, records[5].retries),
                         ([1, "two"], {"x": 3}, 2))
        self.assertEqual(records[3].key, "k1")

    def test_a_daemon_starts_on_a_format_1_state_and_writes_format_2(self):
        d = support.Daemon(self.tmp)
        d.start()
        self.addCleanup(lambda: d.proc.poll() is None and d.kill())
        stats = d.call(op="stats")
        self.assertTrue(stats["paused"])
        self.assertEqual(stats["counts"]["pending"], 3)
        self.assertEqual(d.get(5)["queue"], "default")
        self.assertEqual(d.stop(), 0)
        with open(os.path.join(self.state, "queue.json")) as f:
            self.assertTrue(f.readline().startswith('{"format":2,'))
        with open(os.path.join(self.state, "journal.jsonl")) as f:
            self.assertEqual(json.loads(f.readline())["format"], 2)

    def newer_refused(self, name: str, data: bytes) -> None:
        path = os.path.join(self.state, name)
        with open(path, "wb") as f:
            f.write(data)
        d = support.Daemon(self.tmp)
        d.start(wait=False)
        self.assertEqual(d.proc.wait(30), 1)
        d.stderr.close()
        self.assertIn("%s: written by a newer jobrunner (format 3; this one reads 1 to 2)" % path,
                      d.read_stderr())
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data, "the newer file is left as it was")

    def test_a_format_3_snapshot_stops_start_up_and_is_kept(self):
        self.newer_refused("queue.json", b'{"format":3,"gen":1,"next_id":2,"paused":false,'
                                         b'"jobs":[\n{"id":1,"state":"pending","new":1}\n]}\n')

    def test_a_format_3_journal_stops_start_up_and_is_kept(self):
        self.newer_refused("journal.jsonl", b'{"gen":1,"format":3}\n{"hold":{"id":1}}\n')


def queues_config(**tables):
    return {"queues": tables}


class QueuesEndToEndTest(support.DaemonTestCase):
    config = {"workers": 1, "queues": {"emails": {"workers": 8, "retries": 2},
                                       "reports": {"workers": 1}}}

    def queues(self):
        reply = self.daemon.call(op="queues")
        self.assertTrue(reply["ok"], reply)
        return {q["name"]: q for q in reply["queues"]}

    def test_add_to_an_unknown_queue_is_not_found_naming_it(self):
        reply = self.daemon.call(op="add", target=TARGET, queue="emials")
        self.assertEqual(reply["error"]["code"], "not_found")
        self.assertIn("emials", reply["error"]["message"])
        reply = self.daemon.call(op="add_batch", jobs=[{"target": TARGET, "queue": "emails"},
                                                       {"target": TARGET, "queue": "nope"}])
        self.assertEqual(reply["error"]["code"], "not_found")
        self.assertIn("jobs[1]", reply["error"]["message"])
        self.assertEqual(sum(self.daemon.call(op="stats")["counts"].values()), 0)
        out = self.daemon.jobctl("add", TARGET, "--queue", "emials")
        self.assertEqual(out.returncode, 2, out)
        self.assertIn("emials", out.stderr)
        self.assertNotIn("Traceback", out.stderr)

    def test_a_slow_queue_does_not_hold_up_another(self):
        slow = self.daemon.add("examples.jobs:DelayedJob", args=[60], queue="reports")
        self.daemon.wait_state(slow, "running")
        waiting = self.daemon.add("examples.jobs:DelayedJob", args=[60], queue="reports")
        mail = self.daemon.add(queue="emails", priority=-10)
        job = self.daemon.wait_job(mail, timeout=20)
        self.assertEqual(job["state"], "succeeded")
        self.assertEqual(self.daemon.get(waiting)["state"], "pending", "reports' one slot is busy")
        q = self.queues()
        self.assertEqual((q["reports"]["running"], q["reports"]["counts"]["pending"]), (1, 1))
        self.assertEqual(q["emails"]["counts"]["succeeded"], 1)
        self.assertEqual(self.daemon.job_events(mail, "started")[0].get("queue"), "emails")
        self.daemon.call(op="cancel", id=slow)
        self.daemon.call(op="cancel", id=waiting)

    def test_queues_table_and_json_through_jobctl(self):
        self.daemon.wait_job(self.daemon.add(queue="emails"))
        out = self.daemon.jobctl("queues")
        self.assertEqual(out.returncode, 0, out)
        rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
        self.assertEqual(set(rows), {"default", "emails", "reports"})
        self.assertIn("0/8", rows["emails"])
        self.assertEqual(out.stdout.splitlines()[0].split()[:3], ["QUEUE", "WORKERS", "PAUSED"])
        out = self.daemon.jobctl("--json", "queues")
        reply = json.loads(out.stdout)
        self.assertEqual([q["name"] for q in reply["queues"]], ["default", "emails", "reports"])
        self.assertEqual(reply["queues"][1]["counts"]["succeeded"], 1)
        out = self.daemon.jobctl("show", str(self.daemon.call(op="list", queue="emails")
                                              ["jobs"][0]["id"]))
        self.assertRegex(out.stdout, r"queue\s*:?\s+emails")

    def test_workers_lowers_and_raises_a_queue_and_a_restart_reapplies_the_config(self):
        out = self.daemon.jobctl("workers", "reports", "0")
        self.assertEqual(out.returncode, 0, out)
        held = self.daemon.add(queue="reports")
        self.assertEqual(self.queues()["reports"]["workers"], 0)
        self.assertEqual(self.daemon.call(op="wait", id=held, timeout=0.3)["done"], False)
        out = self.daemon.jobctl("workers", "reports", "2")
        self.assertEqual(out.returncode, 0, out)
        self.assertEqual(self.daemon.call(op="stats")["workers"], 1, "stats: the default's")
        reply = self.daemon.call(op="set_workers", queue="default", workers=3)
        self.assertEqual((reply["queue"]["name"], reply["queue"]["workers"]), ("default", 3))
        self.assertEqual(self.daemon.call(op="stats")["workers"], 3)
        self.assertEqual(self.daemon.wait_job(held)["state"], "succeeded")
        for bad in (["workers", "reports", "-1"], ["workers", "nope", "1"]):
            out = self.daemon.jobctl(*bad)
            self.assertEqual(out.returncode, 2, (bad, out))
        reply = self.daemon.call(op="set_workers", queue="reports", workers=True)
        self.assertEqual(reply["error"]["code"], "bad_request")
        self.daemon.stop()
        self.daemon.start()
        self.assertEqual(self.queues()["reports"]["workers"], 1)
        self.assertEqual(self.queues()["default"]["workers"], 1)

    def test_lowering_lets_running_attempts_finish(self):
        ids = [self.daemon.add("examples.jobs:DelayedJob", args=[0.5], queue="emails")
               for _ in range(3)]
        support.wait_until(lambda: self.queues()["emails"]["running"] == 3, 20)
        self.daemon.call(op="set_workers", queue="emails", workers=1)
        later = self.daemon.add(queue="emails")
        for i in ids:
            self.assertEqual(self.daemon.wait_job(i)["state"], "succeeded")
        self.assertEqual(self.daemon.wait_job(later)["state"], "succeeded")

    def test_pause_queue_survives_a_sigkill_restart(self):
        out = self.daemon.jobctl("pause", "--queue", "emails")
        self.assertEqual(out.returncode, 0, out)
        held = self.daemon.add(queue="emails")
        other = self.daemon.add()
        self.assertEqual(self.daemon.wait_job(other)["state"], "succeeded")
        self.daemon.kill()
        self.daemon.start()
        q = self.queues()
        self.assertTrue(q["emails"]["paused"])
        self.assertFalse(q["default"]["paused"] or q["reports"]["paused"])
        self.assertFalse(self.daemon.call(op="stats")["paused"])
        self.assertEqual(self.daemon.call(op="wait", id=held, timeout=0.3)["done"], False)
        self.assertEqual(self.daemon.stop(), 0)            # a graceful stop: the snapshot
        self.daemon.start()
        self.assertTrue(self.queues()["emails"]["paused"])
        out = self.daemon.jobctl("resume", "--queue", "emails")
        self.assertEqual(out.returncode, 0, out)
        self.assertEqual(self.daemon.wait_job(held)["state"], "succeeded")
        self.daemon.kill()
        self.daemon.start()
        self.assertFalse(self.queues()["emails"]["paused"])
        out = self.daemon.jobctl("pause", "--queue", "nope")
        self.assertEqual(out.returncode, 2, out)

    def test_list_by_queue_through_jobctl(self):
        mine = [self.daemon.add(queue="reports", delay=3600) for _ in range(3)]
        self.daemon.add(delay=3600)
        reply = self.daemon.call(op="list", queue="reports")
        self.assertEqual([j["id"] for j in reply["jobs"]], mine)
        out = self.daemon.jobctl("--json", "list", "--queue", "reports")
        self.assertEqual([j["id"] for j in json.loads(out.stdout)], mine)
        out = self.daemon.jobctl("list", "--queue", "reports")
        self.assertEqual([int(line.split()[0]) for line in out.stdout.splitlines()[1:]], mine)

    def test_sighup_adds_a_queue_and_undeclares_one(self):
        left = self.daemon.add(queue="reports", delay=0.5)
        self.daemon.config["queues"] = {"emails": {"workers": 8}, "bulk": {"workers": 1}}
        self.daemon.write_config()
        self.daemon.proc.send_signal(signal.SIGHUP)
        support.wait_until(lambda: "bulk" in self.queues(), 10)
        q = self.queues()
        self.assertFalse(q["reports"]["declared"])
        self.assertEqual(q["reports"]["counts"]["pending"], 1)
        self.assertTrue(q["bulk"]["declared"])
        self.assertEqual(self.daemon.wait_job(self.daemon.add(queue="bulk"))["state"],
                         "succeeded")
        reply = self.daemon.call(op="add", target=TARGET, queue="reports")
        self.assertEqual(reply["error"]["code"], "not_found")
        self.assertEqual(self.daemon.call(op="wait", id=left, timeout=1.0)["done"], False)
        # A config that no longer parses is refused: the queues stay as they are.
        good = self.daemon.config["queues"]
        self.daemon.config["queues"] = {"bulk2": {"workers": -3}}
        self.daemon.write_config()
        self.daemon.config["queues"] = good
        self.daemon.proc.send_signal(signal.SIGHUP)
        support.wait_until(lambda: "keeping the old config" in self.daemon.read_stderr(), 10)
        self.assertIn("queues.bulk2.workers", self.daemon.read_stderr())
        self.assertTrue(self.queues()["bulk"]["declared"])
        # Declared again: its job runs.
        self.daemon.config["queues"]["reports"] = {"workers": 1}
        self.daemon.write_config()
        self.daemon.proc.send_signal(signal.SIGHUP)
        self.assertEqual(self.daemon.wait_job(left)["state"], "succeeded")


STUBBORN = """
import os, signal, time

def stubborn(marker):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(marker, "w").close()
    time.sleep(60)
"""


class CancelledAttemptHoldsItsSlotTest(support.DaemonTestCase):
    """As before queues, an attempt holds its slot until its process is gone: a cancelled one
    being killed (SIGTERM ignored, SIGKILL after kill_grace) still counts in its queue."""
    config = {"workers": 1, "kill_grace": 1, "allow": ["examples.*:*", "qjobs:*"],
              "queues": {"reports": {"workers": 1}}}

    def prepare(self):
        self.write_job_module("qjobs", STUBBORN)

    def test_the_next_job_of_that_queue_waits_for_the_kill(self):
        marker = os.path.join(self.root, "ready")
        slow = self.daemon.add("qjobs:stubborn", args=[marker], queue="reports")
        support.wait_until(lambda: os.path.exists(marker), 20, message="the job to start")
        self.assertTrue(self.daemon.call(op="cancel", id=slow)["ok"])
        after = self.daemon.add(queue="reports")
        other = self.daemon.add()
        self.assertEqual(self.daemon.wait_job(other)["state"], "succeeded")
        reply = self.daemon.call(op="queues")
        reports = {q["name"]: q for q in reply["queues"]}["reports"]
        if self.daemon.get(slow)["exit_code"] is None:       # still being killed
            self.assertEqual(reports["running"], 1)
            self.assertEqual(self.daemon.get(after)["state"], "pending")
        self.assertEqual(self.daemon.wait_job(after)["state"], "succeeded")
        self.assertEqual(self.daemon.get(slow)["exit_code"], -9)
        started = float(self.daemon.get(after)["started_at"])
        self.assertGreaterEqual(started, self.daemon.get(slow)["finished_at"] + 0.9)


class FoldKeepsQueuePausesTest(support.DaemonTestCase):
    """The background fold (a forked child writing the snapshot) carries the queue pauses:
    with the journal folded after every change, a pause is then only in queue.json."""
    config = {"workers": 1, "queues": {"emails": {"workers": 1}}}
    daemon_preamble = "jr.JOURNAL_MIN_COMPACT = 1"

    def snapshot_head(self):
        try:
            with open(os.path.join(self.daemon.state_dir, "queue.json")) as f:
                return json.loads(f.readline()[:-len(',"jobs":[\n')] + "}")
        except FileNotFoundError:           # no fold has ended yet
            return {}

    def test_a_fold_writes_the_queue_pauses_and_a_restart_reads_them(self):
        self.assertTrue(self.daemon.call(op="pause", queue="emails")["ok"])
        held = self.daemon.add(queue="emails")
        support.wait_until(lambda: self.snapshot_head().get("queues")
                           == {"emails": {"paused": True}}, 10, message="a fold")
        self.assertEqual(self.snapshot_head()["format"], 2)
        self.daemon.kill()
        self.daemon.start()
        reply = self.daemon.call(op="queues")
        self.assertTrue({q["name"]: q for q in reply["queues"]}["emails"]["paused"])
        self.assertEqual(self.daemon.get(held)["state"], "pending")


class QueuePauseOnAFailedWriteTest(InProcessDaemonCase):
    """pause/resume --queue is durable: with the disk refusing, the reply is io_error and the
    queue's pause is as it was, in memory and on disk."""

    def setUp(self):
        super().setUp()
        self.d.cfg.queues = {"emails": {"workers": 1, "isolation": "fresh",
                                        "max_jobs_per_worker": 1000}}
        self.d.scheduler.configure(self.d.cfg)      # as a SIGHUP applies a config

    def meta_on_disk(self):
        dup = self.state + "-copy-%d" % time.monotonic_ns()
        shutil.copytree(self.state, dup, ignore=shutil.ignore_patterns("lock"))
        store = jr.Store(dup, fsync=False)
        try:
            return store.load()[0]
        finally:
            store.close()

    def paused(self):
        return {q["name"]: q["paused"] for q in self.call(op="queues")["queues"]}

    def test_a_refused_pause_is_undone_and_a_later_one_is_kept(self):
        eio = OSError(errno.EIO, "injected EIO")
        with mock.patch.object(jr.os, "fdatasync", side_effect=eio), \
                mock.patch.object(jr.os, "fsync", side_effect=eio):
            reply = self.call(op="pause", queue="emails")
            self.assertEqual(reply["error"]["code"], "io_error", reply)
            self.assertEqual(self.paused(), {"default": False, "emails": False})
        self.assertNotIn("emails", self.meta_on_disk().get("queues", {}))
        support.wait_until(lambda: self.call(op="pause", queue="emails")["ok"], 10,
                           message="the store to work again")
        self.assertEqual(self.paused(), {"default": False, "emails": True})
        self.assertEqual(self.meta_on_disk()["queues"], {"emails": {"paused": True}})
        self.assertFalse(self.meta_on_disk()["paused"], "the whole daemon is not paused")


if __name__ == "__main__":
    unittest.main()
