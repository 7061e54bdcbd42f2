"""The enqueue fast paths give what the general paths give (issue #17, item 3).

`add` and `add_batch` take shortcuts for the common case: a new job's journal record is filled
into a template of its shape (RecordTemplates) instead of encoded field by field, a plain add
object (target, args, kwargs) takes its defaults from one dict per config (plain_add), and a
request line is scanned without decode()'s whitespace matches. Each shortcut is checked here
against the general path on a table of inputs: the same records (and what loads back from the
journal), the same fields, the same errors word for word. A pipelined run of plain adds is
answered at once and created in one create() (Protocol.hold_add): a pipeline of mixed requests
gets the same replies sent at once as sent one at a time. Then one daemon: pipelined adds and
a batch of mixed shapes, SIGKILL, restart: every job reads back as it was acknowledged.
"""
import json
import os
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
from tests.support import Daemon, DaemonTestCase, Raw, in_process_daemon  # noqa: E402

TARGET = "examples.jobs:ExampleJob"
NOW = 1_800_000_000.123456


def config(root: str, **values) -> jr.Config:
    base = {"socket": os.path.join(root, "d.sock"), "state_dir": os.path.join(root, "state"),
            "log_dir": os.path.join(root, "logs"), "job_paths": [ROOT],
            "queues": {"emails": {"workers": 1, "retries": 5, "timeout": 10, "priority": 3,
                                  "backoff": "fixed", "retry_delay": 2.5}}}
    base.update(values)
    return jr.load_config(None, base)


def outcome(fn, *args, **kwargs):
    """What a call gives: ("ok", value with the type of every number) or ("error", code,
    message)."""
    try:
        value = fn(*args, **kwargs)
    except jr.ProtocolError as exc:
        return ("error", exc.code, exc.message)
    return ("ok", typed(value))


def typed(value):
    """value with each number as (type, number): 1 and 1.0 and True stay apart."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    if isinstance(value, (int, float)):
        return (type(value).__name__, value)
    return value


# Add objects of many shapes: what a client may send (plain ones take the fast path).
ADDS = [
    {"target": TARGET},
    {"target": TARGET, "args": [1, 2]},
    {"target": TARGET, "args": [], "kwargs": {}},
    {"target": TARGET, "kwargs": {"a": [1, {"b": None}], "%s": "100%"}},
    {"target": TARGET, "args": ["é\u2028\"\\", 1.5, True, None, -0.0, 10 ** 30]},
    {"target": TARGET, "method": "run", "args": [1]},
    {"target": TARGET, "priority": -7, "retries": 3, "retry_delay": 1, "timeout": 0.5},
    {"target": TARGET, "retry_delay": 2.0, "timeout": None, "backoff": "fixed"},
    {"target": TARGET, "delay": 30},
    {"target": TARGET, "delay": 0.25, "args": [3]},
    {"target": TARGET, "run_at": NOW + 60.5},
    {"target": TARGET, "run_at": NOW},
    {"target": TARGET, "key": "k-%d %s 100% \"quoted\" é"},
    {"target": TARGET, "queue": "emails", "args": [1]},
    {"target": TARGET, "queue": "emails", "priority": 0, "retries": 0},
    {"target": TARGET, "queue": "default"},
    {"target": TARGET, "on_parent_failure": "run"},
]


class TableCase(unittest.TestCase):
    """A JobTable on a store and log of its own, at NOW."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="jr-enq-")
        self.addCleanup(tmp.cleanup)
        self.cfg = config(tmp.name)
        os.makedirs(self.cfg.state_dir)
        os.makedirs(self.cfg.log_dir)
        self.store = jr.Store(self.cfg.state_dir, fsync=False)
        self.addCleanup(self.store.close)
        meta, records = self.store.load()
        self.log = jr.EventLog(self.cfg.log_dir, clock=lambda: NOW)
        self.addCleanup(self.log.close)
        self.table = jr.JobTable(self.store, self.log, clock=lambda: NOW)
        self.table.load(meta, records)

    def create(self, items, now=NOW, uid=1000, **extra):
        """Jobs from add objects as op_add_batch makes them; returns them and the journal
        line create() appended."""
        batch = []
        for i, item in enumerate(items):
            fields = jr.validate_add(item, self.cfg, now, position=i)
            fields.update(uid=uid, **extra)
            batch.append(fields)
        before = len(self.store.lines)
        jobs = self.table.create(now, batch)
        return jobs, self.store.lines[before]

    def assert_journaled(self, jobs, line):
        expected = '{"jobs":[' + jr.RECORD_SEP.join(jr._encode(job.stored()) for job in jobs) \
            + "]}\n"
        self.assertEqual(line, expected)


class RecordTemplatesTest(TableCase):
    """create()'s journal line equals _encode(job.stored()) of every job, and loads back."""

    def test_each_shape_alone_and_again(self):
        for item in ADDS:
            with self.subTest(item=item):
                for now in (NOW, NOW + 1, NOW + 1):         # a template made, then used
                    jobs, line = self.create([item], now=now)
                    self.assert_journaled(jobs, line)

    def test_a_batch_of_all_shapes_twice(self):
        jobs, line = self.create(ADDS + ADDS)
        self.assert_journaled(jobs, line)
        self.assertEqual(len(jobs), 2 * len(ADDS))

    def test_blocked_children_uids_schedules_and_int_times(self):
        parents, _ = self.create([{"target": TARGET}, {"target": TARGET}])
        after = [parents[0].id, parents[1].id]
        jobs, line = self.create([{"target": TARGET, "after": after, "delay": 5},
                                  {"target": TARGET, "after": after[:1]},
                                  {"target": TARGET, "after": after[1:], "key": "x"}])
        self.assertEqual([job.state for job in jobs], [jr.BLOCKED] * 3)
        self.assert_journaled(jobs, line)
        for uid in (None, 0, 1000):
            jobs, line = self.create(ADDS[:3], uid=uid)
            self.assert_journaled(jobs, line)
        jobs, line = self.create(ADDS[:2], schedule="nightly", fire_at=NOW - 1.5)
        self.assert_journaled(jobs, line)
        jobs, line = self.create(ADDS[:2], now=1_800_000_000)      # an int clock (tests)
        self.assert_journaled(jobs, line)

    def test_more_shapes_than_kept(self):
        with mock.patch.object(jr.RecordTemplates, "MAX_SHAPES", 2):
            for round_ in range(3):
                jobs, line = self.create(ADDS)
                self.assert_journaled(jobs, line)
        self.assertLessEqual(len(self.table.records.templates), 2)

    def test_a_job_with_an_unhashable_field_is_encoded_in_full(self):
        job = jr.Job(id=5, target=TARGET, state=jr.SUCCEEDED, attempts=1, created_at=NOW,
                     run_at=NOW, result={"rows": [1, 2]}, finished_at=NOW + 1)
        self.assertEqual(jr.RecordTemplates().encode(job), jr._encode(job.stored()))

    def test_the_journal_loads_back_the_same_jobs(self):
        jobs, _ = self.create(ADDS + ADDS)
        self.store.commit()
        meta, records = jr.Store(self.cfg.state_dir, fsync=False).load()
        for job in jobs:
            self.assertEqual(jr.Job.from_stored(records[job.id]).record(), job.record())


class QueuedLinesTest(TableCase):
    """EventLog.queued() writes the usual line in one format: the same line as the general
    one (the job part of _job_part(), then uid, priority and run_at) for every kind of job."""

    def test_the_same_lines_as_the_general_format(self):
        jobs, _ = self.create(ADDS + [{"target": "examples.jobs:Odd_Name", "queue": "emails"}])
        jobs += self.create(ADDS[:3], uid=None)[0]
        jobs += self.create(ADDS[:3], schedule="nightly", fire_at=NOW)[0]
        for when in (NOW, 1_800_000_000, 0.0005, 1_800_000_000.9996):
            with self.subTest(when=when):
                self.log.buffers["events"].clear()
                self.log.targets.clear()        # the first line of a target goes the long way
                self.log.queued(when, jobs)
                self.log.queued(when, jobs)
                job_part = self.log._job_part()
                expected = ["%s event=queued job=%s%s priority=%d run_at=%.3f\n"
                            % (jr.log_time(when), job_part(job),
                               "" if job.uid is None else " uid=%d" % job.uid,
                               job.priority, job.run_at) for job in jobs]
                self.assertEqual(self.log.buffers["events"], expected * 2)

    def test_log_time_as_formatted_in_full(self):
        for t in (0, 0.0004, 0.0015, 0.9995, 0.9996, 59.9999, 1_800_000_000.0005,
                  *(1_800_000_000 + k * 0.0137 for k in range(2000))):
            seconds, ms = divmod(round(t * 1000), 1000)
            self.assertEqual(jr.log_time(t), time.strftime("%Y-%m-%dT%H:%M:%S",
                                                           time.gmtime(seconds))
                             + ".%03dZ" % ms)


class PlainAddTest(unittest.TestCase):
    """plain_add() gives what the full validate_add() gives, fields or error."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="jr-enq-")
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name

    REQUESTS = [
        {"target": TARGET},
        {"op": "add", "target": TARGET, "args": [1, "a"]},
        {"target": TARGET, "args": [], "kwargs": {}},
        {"target": TARGET, "kwargs": {"x": 1}},
        {"target": TARGET, "args": "no"},
        {"target": TARGET, "args": None},
        {"target": TARGET, "kwargs": [1]},
        {"target": 5},
        {"target": None},
        {"args": [1]},
        {},
        {"target": "examples.jobs:_private"},
        {"target": "examples.jobs._x:Y"},
        {"target": "not a target"},
        {"target": "os:system"},
        {"target": "x" * 600 + ":y"},
    ]

    def test_the_same_fields_and_errors_as_the_full_path(self):
        configs = [config(self.root), config(self.root, retries=4, retry_delay=2,
                                            backoff="fixed", timeout=0),
                   config(self.root, timeout=12.5, retry_delay=0.5, allow=["os:*"])]
        for cfg in configs:
            for req in self.REQUESTS:
                for where, position in (("", None), ("jobs[3]: ", 3)):
                    with self.subTest(cfg=cfg.values if hasattr(cfg, "values") else cfg,
                                      req=req, where=where):
                        fast = outcome(jr.validate_add, req, cfg, NOW, where, position)
                        # `method: null` changes nothing but takes the full path
                        full = outcome(jr.validate_add, {**req, "method": None}, cfg, NOW,
                                       where, position)
                        self.assertEqual(fast, full)
            # the same config object changed in place (as SIGHUP changes some keys)
            retries, cfg.retries = cfg.retries, cfg.retries + 7
            self.assertEqual(outcome(jr.validate_add, {"target": TARGET}, cfg, NOW),
                             outcome(jr.validate_add, {"target": TARGET, "method": None}, cfg,
                                     NOW))
            cfg.retries = retries
            valid = jr.plain_add({"target": TARGET}, cfg, NOW)
            if cfg.allow == ["os:*"]:
                self.assertIsNone(valid)            # not allowed: the full path words it
            else:
                self.assertIsNotNone(valid)         # the fast path was taken


def old_decode(line: bytes) -> dict:
    """decode_request() as it was before the scan shortcut: the reference."""
    try:
        text = line.decode("utf-8")
        req = jr._decode_request(text)
    except UnicodeDecodeError as exc:
        raise jr.ProtocolError("bad_request", "request is not UTF-8 (byte %d)"
                               % exc.start) from None
    except RecursionError:
        raise jr.ProtocolError("bad_request", "request nests too deeply") from None
    except ValueError as exc:
        raise jr.ProtocolError("bad_request", "request is not JSON: %s" % exc) from None
    if not isinstance(req, dict):
        raise jr.ProtocolError("bad_request", "request must be a JSON object")
    if jr.too_deep(req, jr.JSON_MAX_DEPTH):
        raise jr.ProtocolError("bad_request", "request nests deeper than %d levels"
                               % jr.JSON_MAX_DEPTH)
    if jr._SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(req, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise jr.ProtocolError("bad_request", "request has a lone UTF-16 surrogate "
                                   "(\\ud800-\\udfff) that is not a character") from None
    return req


class DecodeTest(unittest.TestCase):
    LINES = [
        b'{"op":"add","target":"examples.jobs:add","args":[7,1]}',
        b' {"op":"hello"}', b'{"op":"hello"} ', b'{"op":"hello"}\r', b'\t{"op":"hello"}\t',
        b'{"op":"hello"}{}', b'{"op":"hello"} x', b'', b'   ', b'[1]', b'"x"', b'1',
        b'{"a":NaN}', b'{"a":Infinity}', b'{"a":1e400}', b'{"a":-1e400}', b'{"a":',
        b'{"a":1,}', b"{'a':1}", b'{"a":"\\ud800"}', b'{"a":"\\ud83d\\ude00"}',
        b'{"a":"\xff"}', b'{"a":1}\x00', b'{"a":"x\ny"}',
        b'{"a":' + b"[" * 70 + b"]" * 70 + b"}",
        b'{"a":' + b"[" * 60 + b"]" * 60 + b"}",
        b'{"a":"' + b"[" * 100 + b'"}',
        b"[" * 5000 + b"]" * 5000,
    ]

    def test_the_same_requests_and_errors_as_decode(self):
        for line in self.LINES:
            with self.subTest(line=line[:80]):
                self.assertEqual(outcome(jr.decode_request, line), outcome(old_decode, line))


class EnqueueCrashTest(DaemonTestCase):
    """Pipelined adds and an add_batch of mixed shapes, acknowledged, then SIGKILL: after the
    restart every job reads back as it was before."""

    config = {"queues": {"emails": {"workers": 1, "retries": 5, "timeout": 10}}}

    def test_acknowledged_jobs_survive_a_kill(self):
        self.daemon.call(op="pause")
        items = [dict(item, target=TARGET) for item in ADDS if "run_at" not in item]
        with Raw(self.daemon.socket) as c:
            c.send_line(b"".join(json.dumps({"op": "add", **item}).encode() + b"\n"
                                 for item in items * 3))
            ids = [c.recv() for _ in range(3 * len(items))]
            self.assertTrue(all(reply["ok"] for reply in ids), ids)
            batch = c.call(op="add_batch", jobs=items * 2)
            self.assertTrue(batch["ok"], batch)
        job_ids = sorted({reply["id"] for reply in ids} | set(batch["ids"]))
        before = {job_id: self.daemon.get(job_id) for job_id in job_ids}
        self.assertEqual(self.daemon.kill(), -signal.SIGKILL)
        self.daemon.start()
        after = {job_id: self.daemon.get(job_id) for job_id in job_ids}
        self.assertEqual(after, before)


def comparable(reply):
    """A reply without its times (two daemons never add at the same instant)."""
    if isinstance(reply, dict):
        return {k: comparable(v) for k, v in reply.items()
                if k not in ("created_at", "run_at", "started_at", "finished_at", "uptime")}
    if isinstance(reply, list):
        return [comparable(v) for v in reply]
    return reply


class HeldAddsTest(unittest.TestCase):
    """Plain adds held for one create() answer what adds made one at a time answer, whatever
    comes between them in the pipeline."""

    PIPELINE = [
        {"op": "add", "target": TARGET, "args": [1]},
        {"op": "add", "target": TARGET},
        {"op": "get", "id": 1},
        {"op": "add", "target": TARGET, "key": "k"},
        {"op": "add", "target": TARGET, "key": "k"},
        {"op": "add", "target": TARGET, "kwargs": {"a": 1}},
        {"op": "add", "target": "examples.jobs:_x"},
        {"op": "add", "target": "os:system"},
        {"op": "add", "target": TARGET, "args": "no"},
        {"op": "add", "target": TARGET, "after": [5, 6]},
        {"op": "cancel", "id": 6},
        {"op": "add", "target": TARGET, "args": [2]},
        {"op": "get", "id": 7},
        {"op": "add_batch", "jobs": [{"target": TARGET}, {"target": TARGET, "after": [-1]}]},
        {"op": "add", "target": TARGET},
        {"op": "list", "state": "pending"},
        {"op": "add", "target": TARGET},
        {"op": "add", "target": TARGET},           # the 12th live job: max_queued
        {"op": "add", "target": TARGET},
        {"op": "stats"},
        {"op": "wait", "id": 6, "timeout": 0},
        {"op": "retry", "id": 6},
        {"op": "add", "target": TARGET},
        {"op": "get", "id": 13},
        {"op": "nope"},
        {"op": "add", "target": TARGET, "args": [3]},
    ]

    def start(self):
        tmp = tempfile.TemporaryDirectory(prefix="jr-held-")
        self.addCleanup(tmp.cleanup)
        daemon = Daemon(tmp.name, max_queued=12)
        daemon.start()
        self.addCleanup(daemon.stop)
        daemon.call(op="pause")
        return daemon

    def test_pipelined_and_one_at_a_time_get_the_same_replies(self):
        pipelined, single = self.start(), self.start()
        lines = [json.dumps(req).encode() + b"\n" for req in self.PIPELINE]
        with Raw(pipelined.socket) as c:
            c.send_line(b"".join(lines))
            at_once = [c.recv() for _ in lines]
        with Raw(single.socket) as c:
            one_by_one = [c.recv() for line in lines if c.send_line(line) or True]
        for req, a, b in zip(self.PIPELINE, at_once, one_by_one):
            with self.subTest(req=req):     # (a message may quote the daemon's config path)
                self.assertEqual(json.dumps(comparable(a)).replace(pipelined.root, "ROOT"),
                                 json.dumps(comparable(b)).replace(single.root, "ROOT"))
        self.assertEqual(sum(1 for r in at_once if r.get("error", {}).get("code")
                             == "queue_full"), 1, at_once)
        stats = [comparable(d.call(op="stats")) for d in (pipelined, single)]
        self.assertEqual(stats[0]["counts"], stats[1]["counts"])

    def test_a_plain_batch_answers_what_the_general_path_answers(self):
        fast, general = self.start(), self.start()
        items = [{"target": TARGET}, {"target": TARGET, "args": [1], "kwargs": {"k": "v"}},
                 {"op": "add", "target": TARGET, "args": []}]
        for jobs in (items, [], items * 2, items * 5):          # the last one: queue_full
            with self.subTest(jobs=len(jobs)):
                a = fast.call(op="add_batch", jobs=jobs)
                # `method: null` changes nothing but takes the general path
                b = general.call(op="add_batch", jobs=[dict(job, method=None) for job in jobs])
                self.assertEqual(json.dumps(a).replace(fast.root, "ROOT"),
                                 json.dumps(b).replace(general.root, "ROOT"))
        self.assertEqual(comparable(fast.call(op="list", limit=100)),
                         comparable(general.call(op="list", limit=100)))

    def test_a_run_of_adds_is_one_journal_entry_and_their_ids_follow(self):
        cfg, _ = support.temp_config(self, "jr-held-", start_method="spawn", job_paths=[ROOT])
        daemon = in_process_daemon(self, cfg)
        daemon.jobs.scheduler.paused = True
        _, theirs = support.client_of(self, daemon)
        theirs.sendall(b"".join(b'{"op":"add","target":"%s","args":[%d]}\n'
                                % (TARGET.encode(), i) for i in range(50)))
        before = daemon.store.size
        daemon.run_pass(1.0)
        theirs.settimeout(10)
        data = b""
        while data.count(b"\n") < 50:
            data += theirs.recv(65536)
        self.assertEqual([json.loads(line)["id"] for line in data.splitlines()],
                         list(range(1, 51)))
        with open(os.path.join(cfg.state_dir, "journal.jsonl"), "rb") as f:
            f.seek(before)
            written = f.read()
        self.assertEqual(written.count(b"\n"), 1, written[:300])
        self.assertEqual([rec["args"] for rec in json.loads(written)["jobs"]],
                         [[i] for i in range(50)])
        # a bug in create() while adds are held: their replies do not say "created"
        with mock.patch.object(daemon.jobs, "create", side_effect=RuntimeError("boom")):
            theirs.sendall(b'{"op":"add","target":"%s"}\n' % TARGET.encode() * 2)
            daemon.run_pass(1.0)
            data = b""
            while data.count(b"\n") < 2:
                data += theirs.recv(65536)
        for line in data.splitlines():
            reply = json.loads(line)
            self.assertFalse(reply["ok"], reply)
            self.assertIn("internal error in add: RuntimeError: boom", reply["error"]["message"])


class CollectorTest(unittest.TestCase):
    def test_the_daemon_sets_its_collector_thresholds_and_the_test_gets_its_own_back(self):
        import gc
        before = gc.get_threshold()
        self.assertNotEqual(before, jr.GC_THRESHOLDS)

        class Inner(unittest.TestCase):
            def runTest(inner):
                cfg, _ = support.temp_config(inner, "jr-gc-", start_method="spawn")
                in_process_daemon(inner, cfg)
                self.assertEqual(gc.get_threshold(), jr.GC_THRESHOLDS)
                self.assertTrue(gc.isenabled())
        result = unittest.TestResult()
        Inner().run(result)
        self.assertEqual((result.errors, result.failures), ([], []))
        self.assertEqual(gc.get_threshold(), before)


if __name__ == "__main__":
    unittest.main()
