"""Attacks on the job process and on pattern queries (SPEC §2 targets and results, §3 patterns
and the 100 ms loop bound). Each case names the defect it provokes:

    WalkOutTest      an allowed pattern (`examples.*:*`) walked out of its module:
                     `examples.jobs:os.system`, `json.codecs.builtins.eval`, a dunder step,
                     a metaclass __getattr__, an instance's __getattr__, an imported class.
                     Dunder steps are a bad_request at add; the rest fail at once, without
                     retry, and a side-effect file proves nothing of the target ran.
    ResultTest       a return value that cannot be kept (5,000 deep, 70 deep, cyclic, not
                     JSON, too large): dropped with a note in the output, the attempt a success.
    ReportTest       malformed reports written to fd 3 (wrong types, not an object, huge, deep,
                     not UTF-8, NaN), with exit 1 and exit 0: the daemon keeps serving, the job
                     fails with "the job process sent an invalid report: ...".
    PatternQueryUnitTest  the target index built in slices amid changes and undo equals one
                     built at once; a query run a slice per step equals a full scan; client
                     patterns never enter fnmatch's cache.
    PatternTest      a `list --target` pattern over 1,024 characters is a bad_request; a
                     hundred pipelined 1,024-character patterns against 20,000 distinct
                     targets do not hold another client's `stats` (the old code held it for
                     all of them in one pass).
"""
import fnmatch
import json
import os
import random
import threading
import time
import unittest

import jobrunnerd as jr
from tests.support import DaemonTestCase
from tests.test_units import TableCase

ALLOW = ["examples.*:*", "tjobs_*:*"]

# A job module with gadgets that would run code if the target walk used getattr().
WALK_MODULE = r'''
import os
from examples.jobs import ExampleJob as Borrowed
MARK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ran")

def _mark(why):
    with open(MARK, "a") as f:
        f.write(why + "\n")

class Meta(type):
    def __getattr__(cls, name):
        _mark("metaclass getattr " + name)
        return os.system

class Gadget(metaclass=Meta):
    pass

class Sneaky:
    def __getattr__(self, name):
        _mark("instance getattr " + name)
        return os.system

thing = Sneaky()

class Described:
    @property
    def prop(self):
        _mark("property")

    @staticmethod
    def static():
        _mark("static")

    @classmethod
    def handle(cls, x):
        return x * 2

class Outer:
    class Inner:
        def handle(self):
            return "inner"

def plain(x):
    return x + 1
'''


class WalkOutTest(DaemonTestCase):
    config = {"allow": ALLOW}

    def prepare(self):
        self.write_job_module("tjobs_walk", WALK_MODULE)
        self.mark = os.path.join(self.root, "jobs", "ran")

    def test_private_steps_are_a_bad_request_at_add(self):
        for target in ("examples.jobs:ExampleJob.__subclasses__", "examples.jobs:_private",
                       "examples.jobs:Outer._Inner", "examples.jobs:__builtins__.eval"):
            reply = self.daemon.call(op="add", target=target)
            self.assertEqual(reply["error"]["code"], "bad_request", (target, reply))
            self.assertIn("'_'", reply["error"]["message"])
        reply = self.daemon.call(op="add_batch", jobs=[
            {"target": "examples.jobs:ExampleJob"},
            {"target": "examples.jobs:ExampleJob.__init__.__globals__"}])
        self.assertEqual(reply["error"]["code"], "bad_request", reply)
        self.assertIn("jobs[1]", reply["error"]["message"])
        self.assertEqual(self.daemon.call(op="list")["jobs"], [])

    def run_refused(self, target, args, why):
        job_id = self.daemon.add(target, args=args, retries=2, retry_delay=0)
        job = self.daemon.wait_job(job_id)
        self.assertEqual(job["state"], "failed", job)
        self.assertEqual(job["attempts"], 1, job)          # permanent: no retry
        self.assertIn("cannot resolve " + target, job["error"])
        self.assertIn(why, job["error"])
        self.assertFalse(os.path.exists(self.mark), "the target ran: %s" % target)

    def test_imported_modules_and_builtins_are_refused(self):
        shell = "touch %s" % self.mark
        self.run_refused("examples.jobs:os.system", [shell], "is a module")
        self.run_refused("examples.jobs:json.codecs.builtins.eval",
                         ["open(%r, 'w')" % self.mark], "is a module")
        self.run_refused("examples.jobs:time.sleep", [0], "is a module")
        self.run_refused("tjobs_walk:Borrowed", [], "defined in examples.jobs, not in tjobs_walk")
        self.run_refused("tjobs_walk:os.system", [shell], "is a module")

    def test_no_code_runs_during_the_walk(self):
        self.run_refused("tjobs_walk:Gadget.system", ["touch %s" % self.mark], "is not defined")
        self.run_refused("tjobs_walk:thing.system", ["touch %s" % self.mark], "Sneaky")
        self.run_refused("tjobs_walk:Described.prop", [], "property")
        self.run_refused("tjobs_walk:Described.static", [], "staticmethod")
        # The method is looked up the same way: a metaclass __getattr__ does not run either.
        job = self.daemon.wait_job(self.daemon.add("tjobs_walk:Gadget", method="system",
                                                   args=["touch %s" % self.mark], retries=2))
        self.assertEqual((job["state"], job["attempts"]), ("failed", 1), job)
        self.assertIn("has no method 'system'", job["error"])
        self.assertFalse(os.path.exists(self.mark))

    def test_what_the_module_defines_still_runs(self):
        for target, args, result in (("examples.jobs:Outer.Inner", [], "inner"),
                                      ("tjobs_walk:Outer.Inner", [], "inner"),
                                      ("tjobs_walk:plain", [41], 42),
                                      ("examples.jobs:add", [1, 2], 3),
                                      ("tjobs_walk:Described", [4], 8)):
            job = self.daemon.wait_job(self.daemon.add(target, args=args))
            self.assertEqual((job["state"], job["result"]), ("succeeded", result), job)


REPORT_MODULE = r"""
import os

def deep(n):
    value = []
    for _ in range(n - 1):
        value = [value]
    return value

def cyclic():
    value = []
    value.append(value)
    return value

def not_json():
    return {"a": object()}

def large(size):
    return "x" * size

def lone_surrogate():
    return "\ud800"

def report(data_hex, code):
    # Writes `data` to fd 3 (the report channel) and ends without a report of its own.
    data = bytes.fromhex(data_hex)
    while data:
        data = data[os.write(3, data):]
    os._exit(code)
"""


class ResultTest(DaemonTestCase):
    config = {"allow": ALLOW, "workers": 4}

    def prepare(self):
        self.write_job_module("tjobs_report", REPORT_MODULE)

    def output(self, job_id):
        reply = self.daemon.call(op="output", id=job_id)
        self.assertTrue(reply["ok"], reply)
        return reply["data"]

    def test_a_result_that_cannot_be_kept_is_dropped_with_a_note(self):
        cases = {"deep 5000": ("tjobs_report:deep", [5000], "nests too deeply to encode"),
                 "deep 70": ("tjobs_report:deep", [70], "nests deeper than 62 levels"),
                 "deep 63": ("tjobs_report:deep", [63], "nests deeper than 62 levels"),
                 "cyclic": ("tjobs_report:cyclic", [], "Circular reference"),
                 "not JSON": ("tjobs_report:not_json", [], "not JSON serializable"),
                 "too large": ("tjobs_report:large", [64 * 1024 + 1], "more than 65536"),
                 "lone surrogate": ("tjobs_report:lone_surrogate", [], "surrogate")}
        ids = {name: self.daemon.add(target, args=args, retries=2, retry_delay=0)
               for name, (target, args, _) in cases.items()}
        for name, (_, _, note) in cases.items():
            with self.subTest(case=name):
                job = self.daemon.wait_job(ids[name])
                self.assertEqual((job["state"], job["attempts"], job["result"]),
                                 ("succeeded", 1, None), job)
                self.assertIn("[jobrunner] result not kept:", self.output(ids[name]))
                self.assertIn(note, self.output(ids[name]))
        self.assertEqual(self.daemon.call(op="hello")["ok"], True)

    def test_a_result_at_the_limits_is_kept(self):
        deep = self.daemon.wait_job(self.daemon.add("tjobs_report:deep", args=[62]))
        self.assertEqual(deep["state"], "succeeded", deep)
        value, depth = deep["result"], 1
        while value:
            value, depth = value[0], depth + 1
        self.assertEqual(depth, 62)
        size = 64 * 1024 - 2                    # the quotes make it 64 KiB encoded
        large = self.daemon.wait_job(self.daemon.add("tjobs_report:large", args=[size]))
        self.assertEqual((large["state"], len(large["result"])), ("succeeded", size))
        self.daemon.kill()                      # and the journal loads back
        self.daemon.start()
        self.assertEqual(len(self.daemon.get(large["id"])["result"]), size)


def _hex(data):
    return (data if isinstance(data, bytes) else data.encode()).hex()


class ReportTest(DaemonTestCase):
    config = {"allow": ALLOW, "workers": 4, "max_request_bytes": 8 << 20}  # the huge one's args

    def prepare(self):
        self.write_job_module("tjobs_report", REPORT_MODULE)

    INVALID = {     # name: (what the job writes to fd 3, its exit code, the reason given)
        "traceback not a str": ('{"status":"error","error":"x","traceback":123}\n', 1,
                                "traceback must be a string"),
        "error not a str": ('{"status":"ok","error":["x"]}\n', 0, "error must be a string"),
        "status not a str": ('{"status":5}\n', 0, "status must be"),
        "status unknown": ('{"status":"great"}\n', 0, "status must be"),
        "unknown field": ('{"status":"ok","exit":0}\n', 0, "unknown field 'exit'"),
        "not an object": ("[1, 2]\n", 0, "not a JSON object"),
        "not JSON": ('{"status":"ok","result":NaN}\n', 0, "not JSON"),
        "torn": ('{"status":"ok","res', 0, "not JSON"),
        "not UTF-8": (b'\xff\xfe{"status":"ok"}\n', 0, "not UTF-8"),
        "lone surrogate": ('{"status":"ok","result":"\\ud800"}\n', 0, "surrogate"),
        "deep": ('{"status":"ok","result":' + "[" * 70 + "]" * 70 + "}\n", 0,
                 "nests deeper than 63 levels"),
        "very deep": ('{"status":"ok","result":' + "[" * 100000 + "]" * 100000 + "}\n", 0,
                      "nests too deeply"),
        "result too large": ('{"status":"ok","result":"%s"}\n' % ("x" * 70000), 0,
                             "more than 65536"),
        "huge": ('{"status":"ok","result":"%s"}\n' % ("x" * (1 << 20)), 0, "at least"),
    }

    def test_an_invalid_report_is_a_failed_attempt_and_the_daemon_serves_on(self):
        ids = {name: self.daemon.add("tjobs_report:report", args=[_hex(data), code])
               for name, (data, code, _) in self.INVALID.items()}
        for name, (_, code, why) in self.INVALID.items():
            with self.subTest(case=name):
                job = self.daemon.wait_job(ids[name])
                self.assertEqual((job["state"], job["exit_code"]), ("failed", code), job)
                self.assertTrue(job["error"].startswith(
                    "the job process sent an invalid report: "), job)
                self.assertIn(why, job["error"])
                self.assertIsNone(job["result"])
        self.assertTrue(self.daemon.call(op="hello")["ok"])
        # What was journalled loads back: a restart neither crashes nor reruns them.
        self.daemon.kill()
        self.daemon.start()
        for name in self.INVALID:
            job = self.daemon.get(ids[name])
            self.assertEqual((job["state"], job["attempts"]), ("failed", 1), (name, job))

    def test_an_invalid_report_is_retried_like_any_failed_attempt(self):
        job = self.daemon.wait_job(self.daemon.add(
            "tjobs_report:report", args=[_hex('{"status":"ok","result":[1],"traceback":7}'), 0],
            retries=1, retry_delay=0))
        self.assertEqual((job["state"], job["attempts"]), ("failed", 2), job)

    def test_long_fields_of_a_valid_report_are_cut(self):
        error_job = self.daemon.add("tjobs_report:report", args=[_hex(json.dumps(
            {"status": "permanent", "error": "e" * 10000, "traceback": "t" * 400000})), 2],
            retries=3)
        job = self.daemon.wait_job(error_job)
        self.assertEqual((job["state"], job["attempts"]), ("failed", 1), job)
        self.assertEqual(job["error"], "e" * 500)
        ok_job = self.daemon.add("tjobs_report:report", args=[_hex(json.dumps(
            {"status": "ok", "result": {"a": "\u00e9"}, "traceback": None})), 0])
        job = self.daemon.wait_job(ok_job)
        self.assertEqual((job["state"], job["result"]), ("succeeded", {"a": "\u00e9"}), job)
        errors = os.path.join(self.daemon.log_dir, "background_jobs_errors.log")
        with open(errors, encoding="utf-8") as f:
            text = f.read()
        self.assertLess(text.count("t"), 300000, "the traceback is cut to 256 KiB")
        self.assertGreater(text.count("t"), 200000)


class PatternQueryUnitTest(TableCase):
    """PatternQuery and the target index, stepped by hand (deadline 0: one slice a step)."""

    TARGETS = ["examples.jobs:T%03d" % i for i in range(300)] + ["reports.x:A", "other.m:B"]

    def fill(self, table, n, rng):
        now = self.clock()
        table.create(now, [dict(target=rng.choice(self.TARGETS), method=None, args=[],
                                kwargs={}, priority=0, run_at=now, retries=0, retry_delay=1.0,
                                backoff="exponential", timeout=None, key=None, uid=0)
                           for _ in range(n)])

    def change(self, table, rng):
        roll = rng.random()
        live = [j for j in table.jobs.values() if j.state == jr.PENDING]
        if roll < 0.4 or not live:
            self.fill(table, rng.randint(1, 3), rng)
        elif roll < 0.8:
            table.transition(rng.choice(live), jr.CANCELLED)
        else:
            done = [j for j in table.jobs.values() if j.state in jr.FINISHED]
            table.remove(rng.sample(done, min(len(done), rng.randint(1, 40))))

    def test_the_index_built_in_slices_amid_changes_and_undo_is_exact(self):
        rng = random.Random(11)
        table = self.make_table()
        self.fill(table, 9000, rng)             # several slices of 2048 ids
        for job in rng.sample(list(table.jobs.values()), 3000):
            table.transition(job, jr.CANCELLED)
        steps = 0
        while not table.index_targets(0.0):
            steps += 1
            if rng.random() < 0.3:
                table.track()
                for _ in range(rng.randint(1, 3)):
                    self.change(table, rng)
                table.undo()
            else:
                for _ in range(rng.randint(1, 3)):
                    self.change(table, rng)
        self.assertGreater(steps, 2, "built over several slices")
        self.assert_consistent(table)           # by_target == a build from scratch

    def test_a_query_in_slices_matches_a_full_scan(self):
        rng = random.Random(5)
        table = self.make_table()
        self.fill(table, 3000, rng)
        for job in rng.sample(list(table.jobs.values()), 500):
            table.transition(job, jr.CANCELLED)
        patterns = ["*", "examples.jobs:T1*", "examples.jobs:T?0?", "*:[AB]", "nomatch*",
                    "*[!0-9]", "examples.jobs:T00[0-5]", ("*a" * 512)[:1024]]
        for few in (0, jr.PatternQuery.FEW_TARGETS):    # the sliced collect, and select()
            for _ in range(40):
                state = rng.choice([None, jr.PENDING, jr.CANCELLED])
                pattern, limit = rng.choice(patterns), rng.choice([1, 7, 100, 1000])
                after = rng.choice([0, rng.randrange(0, table.next_id + 1)])
                expected = [i for i in sorted(table.jobs) if i > after
                            and (state is None or table.jobs[i].state == state)
                            and fnmatch.fnmatchcase(table.jobs[i].target, pattern)][:limit]
                query = jr.PatternQuery(table, state, pattern, after, limit)
                query.FEW_TARGETS = few
                while not query.step(0.0):
                    pass
                self.assertEqual([j.id for j in query.jobs], expected,
                                 (few, state, pattern, after, limit))

    def test_client_patterns_never_fill_fnmatchs_cache(self):
        # fnmatch keeps 32,768 compiled patterns: 20-45 MB each for a 1 MB pattern.
        table = self.make_table()
        self.fill(table, 100, random.Random(1))
        fnmatch._compile_pattern.cache_clear()
        for i in range(50):
            table.select(None, "examples.*%d" % i, 0, 100)
        self.assertEqual(fnmatch._compile_pattern.cache_info().currsize, 0)


class PatternTest(DaemonTestCase):
    config = {"max_request_bytes": 2 << 20, "max_queued": 100000}

    def test_a_pattern_over_1024_characters_is_a_bad_request(self):
        with self.daemon.raw() as c, self.daemon.raw() as other:
            c.send(op="list", target="*a" * 500000)         # held the loop 9-12 s
            other.send(op="hello")
            reply = c.recv()
            self.assertEqual(reply.get("error", {}).get("code"), "bad_request", reply)
            self.assertIn("1024", reply["error"]["message"])
            self.assertTrue(other.recv()["ok"])
            for target, code in (("*" * 1025, "bad_request"), (["*"], "bad_request"),
                                 ("*" * 1024, None), ("?" * 1024, None)):
                reply = c.call(op="list", target=target)
                self.assertEqual(reply.get("error", {}).get("code"), code, (target, reply))

    def test_pattern_queries_do_not_hold_the_loop(self):
        n = 20000
        with self.daemon.raw() as c:
            self.assertTrue(c.call(op="pause")["ok"])
            for start in range(0, n, 1000):
                reply = c.call(op="add_batch", jobs=[{"target": "examples.jobs:T%05d" % i}
                                                     for i in range(start, start + 1000)])
                self.assertTrue(reply["ok"], reply)
        # Pipelined, so that the old code served them all in one pass; 1,024 characters, each
        # a new one (no cache helps), then one that matches.
        patterns = ["*?" * 510 + "%04d" % i for i in range(100)] + ["examples.jobs:T0001?"]
        worst, done = [0.0], threading.Event()

        def probe():
            with self.daemon.raw() as p:
                while not done.is_set():
                    t0 = time.monotonic()
                    self.assertTrue(p.call(op="stats")["ok"])
                    worst[0] = max(worst[0], time.monotonic() - t0)
                    done.wait(0.01)
        thread = threading.Thread(target=probe)
        thread.start()
        try:
            with self.daemon.raw(timeout=60) as c:
                c.send_line(b"".join(json.dumps({"op": "list", "target": p}).encode() + b"\n"
                                     for p in patterns))
                replies = [c.recv() for _ in patterns]
        finally:
            done.set()
            thread.join(30)
        self.assertEqual([r["jobs"] for r in replies[:-1]], [[]] * (len(patterns) - 1))
        self.assertEqual([j["target"] for j in replies[-1]["jobs"]],
                         ["examples.jobs:T%05d" % i for i in range(10, 20)])
        # Each reply took passes of ~15 ms; the old code held the loop for all of them at once
        # (1-2 s here). 0.5 s leaves room for a loaded machine.
        self.assertLess(worst[0], 0.5, "a stats waited %.2fs" % worst[0])


if __name__ == "__main__":
    unittest.main()
