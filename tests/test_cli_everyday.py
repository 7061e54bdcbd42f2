"""The everyday CLI (issue #16, part A; SPEC §3 `list`, SPEC §4): `list` pages newest first
with `more` and `total` from the counters, `jobctl list`'s rows and paging line, durations,
`--json` always one document, `completion`, `--version`, the Python-version check, the
`not_allowed` message, and the README's sample output kept true.

End-to-end tests run `jobctl.py` as a subprocess against a real daemon and look at its stdout,
stderr and exit code; the table tests step a JobTable directly. No fixed sleeps.
"""
import fnmatch
import json
import os
import pty
import random
import re
import subprocess
import sys
import time
import unittest

from tests.support import JOBCTL, ROOT, DaemonTestCase, wait_until
from tests.test_units import TableCase

import jobctl  # noqa: E402
import jobrunnerd as jr  # noqa: E402

LATER = "1h"            # --delay that keeps a job pending for the whole test


####################################################################################################
# SPEC §3 list: order, before_id, more, total (the table, stepped directly)
####################################################################################################

class ListPagingTableTest(TableCase):

    def test_desc_pages_and_totals_match_a_full_scan(self):
        # Every path of select() (all ids, a queue's ids, a rare state's ids, few targets,
        # many targets through a PatternQuery) newest first, against filtering by hand; the
        # totals from the counters against counting by hand.
        rng = random.Random(16)
        table = self.make_table()
        targets = ["examples.jobs:A", "examples.jobs:B", "examples.other:C", "reports.x:D"]
        targets += ["many.t%d:X" % i for i in range(80)]     # > FEW_TARGETS for "many.*"
        now = self.clock()
        table.create(now, [dict(target=rng.choice(targets), method=None, args=[], kwargs={},
                                priority=0, run_at=now, retries=0, retry_delay=1.0,
                                backoff="exponential", timeout=None, key=None, uid=0,
                                queue=rng.choice(["default", "emails"]))
                           for _ in range(400)])
        for job in list(table.jobs.values()):
            if rng.random() < 0.1:
                table.transition(job, jr.CANCELLED)
        patterns = [None, "examples.jobs:*", "*:C", "many.*", "*", "nomatch.*"]
        for _ in range(300):
            state = rng.choice([None, None, jr.PENDING, jr.CANCELLED, jr.FAILED])
            queue = rng.choice([None, "default", "emails", "nope"])
            pattern, limit = rng.choice(patterns), rng.choice([1, 3, 50, 1000])
            before = rng.choice([2 ** 63 - 1, rng.randrange(1, table.next_id + 2)])
            match = [i for i in sorted(table.jobs, reverse=True)
                     if (state is None or table.jobs[i].state == state)
                     and (queue is None or table.jobs[i].queue == queue)
                     and (pattern is None or fnmatch.fnmatchcase(table.jobs[i].target, pattern))]
            got = [j.id for j in table.select(state, pattern, 0, limit, queue=queue,
                                              before_id=before)]
            self.assertEqual(got, [i for i in match if i < before][:limit],
                             (state, queue, pattern, before, limit))
            if pattern is None:
                self.assertEqual(table.total(state, queue), len(match), (state, queue))
            else:
                query = jr.PatternQuery(table, state, pattern, 0, limit, queue, before, count=True)
                self.assertTrue(query.step(float("inf")))
                self.assertEqual(query.total, len(match), (state, queue, pattern))

    def test_total_reads_counters_not_jobs(self):
        # A plain, state- or queue-filtered total never looks at a job: with the job dict
        # swapped for one that refuses iteration, it still answers.
        table = self.make_table()
        for _ in range(5):
            self.add(table)
        table.transition(table.jobs[2], jr.CANCELLED)

        class NoWalk(dict):
            def __iter__(self):
                raise AssertionError("walked the jobs")
            values = items = keys = __iter__

        table.jobs = NoWalk(table.jobs)
        self.assertEqual(table.total(None, None), 5)
        self.assertEqual(table.total(jr.PENDING, None), 4)
        self.assertEqual(table.total(jr.CANCELLED, "default"), 1)
        self.assertEqual(table.total(None, "nope"), 0)


####################################################################################################
# End to end: a real daemon, through the socket and jobctl
####################################################################################################

class EverydayCase(DaemonTestCase):

    def ctl(self, *args, code=0, env=None, **kw):
        """Run jobctl (subprocess) and check its exit code; returns the CompletedProcess."""
        if env is None:
            proc = self.daemon.jobctl(*args, **kw)
        else:
            proc = subprocess.run([sys.executable, JOBCTL, "--socket", self.daemon.socket, *args],
                                  capture_output=True, text=True, timeout=60,
                                  env={**os.environ, **env}, **kw)
        self.assertEqual(proc.returncode, code, "jobctl %s: exit %d\nstdout: %s\nstderr: %s"
                         % (" ".join(args), proc.returncode, proc.stdout, proc.stderr))
        return proc

    def ctl_json(self, *args, code=0):
        proc = self.ctl("--json", *args, code=code)
        try:
            return json.loads(proc.stdout)
        except ValueError as exc:
            self.fail("jobctl --json %s: stdout is not one JSON document (%s): %r"
                      % (" ".join(args), exc, proc.stdout))

    def add_many(self, n, **fields):
        jobs = [dict(target="examples.jobs:ExampleJob", delay=3600, **fields) for _ in range(n)]
        return self.daemon.call(op="add_batch", jobs=jobs)["ids"]


class ListProtocolTest(EverydayCase):

    def test_order_before_id_more_and_total(self):
        ids = self.add_many(7)
        self.daemon.call(op="cancel", id=ids[1])
        call = self.daemon.call
        reply = call(op="list", limit=3)
        self.assertEqual(([j["id"] for j in reply["jobs"]], reply["more"], reply["total"]),
                         (ids[:3], True, 7))
        reply = call(op="list", order="desc", limit=3)
        self.assertEqual(([j["id"] for j in reply["jobs"]], reply["more"], reply["total"]),
                         (ids[:-4:-1], True, 7))
        reply = call(op="list", order="desc", before_id=ids[3], limit=3)
        self.assertEqual(([j["id"] for j in reply["jobs"]], reply["more"]),
                         ([ids[2], ids[1], ids[0]], False))
        reply = call(op="list", after_id=ids[4])
        self.assertEqual(([j["id"] for j in reply["jobs"]], reply["more"], reply["total"]),
                         (ids[5:], False, 7))
        reply = call(op="list", state="pending", order="desc", limit=5)
        self.assertEqual(([j["id"] for j in reply["jobs"]], reply["more"], reply["total"]),
                         (ids[:1:-1], True, 6))
        reply = call(op="list", target="examples.*", order="desc", limit=2, before_id=ids[-1])
        self.assertEqual(([j["id"] for j in reply["jobs"]], reply["more"], reply["total"]),
                         ([ids[5], ids[4]], True, 7))
        reply = call(op="list", target="*:ExampleJob", state="cancelled")
        self.assertEqual(([j["id"] for j in reply["jobs"]], reply["more"], reply["total"]),
                         ([ids[1]], False, 1))

    def test_bad_combinations_are_bad_requests(self):
        for req in ({"before_id": 3}, {"before_id": 3, "order": "asc"},
                    {"after_id": 3, "order": "desc"}, {"order": "newest"}, {"order": "desc",
                                                                          "before_id": 0}):
            reply = self.daemon.call(op="list", **req)
            self.assertEqual(reply.get("error", {}).get("code"), "bad_request", req)
