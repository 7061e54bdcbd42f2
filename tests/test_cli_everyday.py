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

from tests.support import JOBCTL, ROOT, wait_until
from tests.test_cli import CliCase
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

    def test_a_state_that_a_queue_lacks_is_answered_without_a_walk(self):
        # Cancelled jobs are common overall (not "rare": select would walk the queue's ids)
        # but the queue has none: its counters say so, and no job is looked at.
        table = self.make_table()
        for _ in range(5):
            table.transition(self.add(table), jr.CANCELLED)
        for _ in range(3):
            self.add(table, queue="emails")

        class NoLook(dict):
            def __getitem__(self, key):
                raise AssertionError("looked at a job")

        table.jobs = NoLook(table.jobs)
        for before in (None, 2 ** 63 - 1):
            self.assertEqual(table.select(jr.CANCELLED, None, 0, 51, queue="emails",
                                          before_id=before), [])


####################################################################################################
# End to end: a real daemon, through the socket and jobctl
####################################################################################################

class EverydayCase(CliCase):          # ctl(), ctl_json(): jobctl checked for its exit code

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


class ListCommandTest(EverydayCase):

    def rows(self, text):
        """The ids of a `jobctl list` table's rows (not the header or the paging line)."""
        return [int(line.split()[0]) for line in text.splitlines()
                if line.split() and line.split()[0].isdigit() and " matching jobs " not in line]

    def test_newest_50_oldest_first_and_a_line_that_says_how_to_page(self):
        ids = self.add_many(60)
        out = self.ctl("list").stdout
        self.assertEqual(self.rows(out), ids[10:])
        last = out.splitlines()[-1]
        self.assertIn("50 of 60 matching jobs shown (10 more)", last)
        for hint in ("older: --before-id %d" % ids[10], "--first", "--all"):
            self.assertIn(hint, last)
        self.assertEqual(self.rows(self.ctl("list", "--first").stdout), ids[:50])
        self.assertNotIn("newer:", last)                 # the newest are shown
        out = self.ctl("list", "--before-id", str(ids[10])).stdout
        self.assertEqual(self.rows(out), ids[:10])
        self.assertIn("newer: --after-id %d," % ids[9], out)
        self.assertNotIn("older:", out)                  # none before the first
        out = self.ctl("list", "--after-id", str(ids[49])).stdout
        self.assertEqual(self.rows(out), ids[50:])
        self.assertIn("10 of 60 matching jobs shown (50 more); older: --before-id %d, the oldest"
                      % ids[50], out)
        out = self.ctl("list", "--first").stdout
        self.assertIn("newer: --after-id %d, the oldest: --first" % ids[49], out)
        self.assertEqual([j["id"] for j in self.ctl_json("list", "--all")], ids)
        self.assertEqual(self.rows(self.ctl("list", "--limit", "3").stdout), ids[-3:])
        # Filters narrow `total` too; all shown: no paging line.
        self.daemon.call(op="cancel", id=ids[5])
        out = self.ctl("list", "--state", "cancelled").stdout
        self.assertEqual((self.rows(out), len(out.splitlines())), ([ids[5]], 2))
        self.ctl("list", "--first", "--all", code=2)
        self.ctl("list", "--limit", "1001", code=2)

    def test_all_reads_every_page(self):
        ids = self.add_many(1001)
        listed = self.ctl_json("list", "--all", "--state", "pending")
        self.assertEqual([j["id"] for j in listed], ids)

    def test_a_row_has_every_column(self):
        failed = self.daemon.add(target="examples.jobs:ErrorJob", queue="default")
        self.daemon.wait_job(failed)
        later = self.daemon.add(priority=7, delay=7200, retries=2)
        out = self.ctl("list", env={"COLUMNS": "200"}).stdout
        header, first, second = out.splitlines()[:3]
        self.assertEqual(header.split(), ["ID", "STATE", "QUEUE", "PRI", "ATTEMPTS", "TARGET", "AGE",
                                          "TIME", "EXIT", "ERROR"])
        record = self.daemon.get(failed)
        self.assertRegex(first, r"^\s*%d\s+failed\s+default\s+0\s+1/1\s+examples\.jobs:ErrorJob\s+"
                                r"\d+s\s+[\d.]+m?s\s+%s\s+%s$"
                         % (failed, record["exit_code"] if record["exit_code"] is not None else "-",
                            re.escape(record["error"].splitlines()[0][:60])))
        self.assertRegex(second, r"^\s*%d\s+pending\s+default\s+7\s+0/3\s+examples\.jobs:ExampleJob"
                                 r"\s+\d+s\s+in (1h|2h)\s+-\s+-$" % later)

    def test_widths_fit_the_terminal(self):
        long_error = self.daemon.add(target="examples.jobs:echo", args=["x" * 300])
        self.daemon.wait_job(long_error)
        self.daemon.add(target="examples.jobs:ErrorJob")
        for columns in (80, 100):
            out = self.ctl("list", env={"COLUMNS": str(columns)}).stdout
            self.assertTrue(all(len(line) <= columns for line in out.splitlines()[:-1]), out)

    def test_schedules_without_any_says_so_and_how_to_declare_one(self):
        self.assertEqual(self.ctl("schedules").stdout,
                         "no schedules: declare them as [schedules.NAME] tables in the config\n")
        self.assertEqual(self.ctl_json("schedules"), {"schedules": []})

    def test_into_a_pipe_without_columns_rows_are_whole(self):
        job_id = self.daemon.add(target="examples.jobs:echo", args=["x" * 300])
        self.daemon.wait_job(job_id)
        failed = self.daemon.add(target="examples.jobs:ErrorJob")
        self.daemon.wait_job(failed)
        error = self.daemon.get(failed)["error"].splitlines()[0]
        for columns in ("", "0"):                               # (neither is a width)
            out = self.ctl("list", env={"COLUMNS": columns}).stdout
            self.assertIn(error, out)
            self.assertIn("examples.jobs:ErrorJob", out)
            self.assertNotIn("\u2026", out)

    def test_colour_only_on_a_terminal_and_never_with_no_color(self):
        job_id = self.daemon.add(target="examples.jobs:ErrorJob")
        self.daemon.wait_job(job_id)
        self.assertNotIn("\x1b", self.ctl("list").stdout)             # a pipe: plain
        self.assertIn("\x1b[31mfailed", self.on_a_terminal({}))
        self.assertNotIn("\x1b", self.on_a_terminal({"NO_COLOR": "1"}))

    def on_a_terminal(self, env):
        """`jobctl list` with stdout on a pseudo-terminal: what it wrote there."""
        master, slave = pty.openpty()
        env = {**os.environ, "COLUMNS": "200", **env}
        if "NO_COLOR" not in env or not env["NO_COLOR"]:
            env.pop("NO_COLOR", None)
        proc = subprocess.Popen([sys.executable, JOBCTL, "--socket", self.daemon.socket, "list"],
                                stdout=slave, stderr=subprocess.PIPE, env=env)
        os.close(slave)
        data = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:                 # EIO: the child closed the terminal
                break
            if not chunk:
                break
            data += chunk
        os.close(master)
        self.assertEqual(proc.wait(timeout=60), 0, proc.stderr.read())
        proc.stderr.close()
        return data.decode()

    def test_show_prints_every_field_with_local_times(self):
        job_id = self.daemon.add(delay=7200, key="k1", args=["a"])
        out = self.ctl("show", str(job_id)).stdout
        for name in self.daemon.get(job_id):
            self.assertRegex(out, r"(?m)^%s: " % name)
        self.assertRegex(out, r"(?m)^created_at: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d "
                              r"\((just now|\d+s ago)\)$")
        self.assertRegex(out, r"(?m)^run_at: \S+ \(in (1h|2h)\)$")


class ScheduleFlagTest(unittest.TestCase):
    """`list --schedule NAME` is passed through as the `schedule` field (the daemon's side
    belongs to the schedules work); checked against a fake daemon that records requests."""

    def test_schedule_is_sent(self):
        from tests.test_jobctl_unit import FakeDaemon
        requests = []

        def respond(request):
            requests.append(request)
            return {"ok": True, "jobs": [], "more": False, "total": 0}

        fake = FakeDaemon(respond)
        self.addCleanup(fake.close)
        self.assertEqual(jobctl.main(["--socket", fake.path, "list", "--schedule", "nightly",
                                      "--queue", "q", "--limit", "5"]), 0)
        self.assertEqual(requests[-1], {"op": "list", "schedule": "nightly", "queue": "q",
                                        "limit": 5, "order": "desc"})


class DurationTest(EverydayCase):

    def test_every_form_parses(self):
        for text, seconds in (("90", 90), ("1.5", 1.5), ("250ms", 0.25), ("90s", 90),
                              ("10m", 600), ("1h30m", 5400), ("2d", 172800), ("1d2h3m4s5ms", 93784.005)):
            self.assertAlmostEqual(jobctl.parse_duration(text), seconds, msg=text)
        for text in ("", "x", "10x", "30m1h", "1h1h", "-5", "inf", "nan", "1 h", "ms", "1e999"):
            with self.assertRaises(ValueError, msg=text):
                jobctl.parse_duration(text)

    def test_flags_take_durations(self):
        job_id = int(self.ctl("add", "examples.jobs:ExampleJob", "--delay", "1h30m",
                              "--retry-delay", "2m", "--timeout", "1h").stdout)
        job = self.daemon.get(job_id)
        self.assertAlmostEqual(job["run_at"] - job["created_at"], 5400, delta=1)
        self.assertEqual((job["retry_delay"], job["timeout"]), (120, 3600))
        started = time.monotonic()
        self.ctl("wait", str(job_id), "--timeout", "250ms", code=4)
        self.assertLess(time.monotonic() - started, 30)
        self.ctl("prune", "--older-than", "2d")
        for args in (("add", "examples.jobs:ExampleJob", "--delay", "10x"),
                     ("wait", str(job_id), "--timeout", "1h1h"), ("prune", "--older-than=-1m")):
            proc = self.ctl(*args, code=2)
            self.assertIn("not a duration", proc.stderr)
            self.assertIn("1h30m", proc.stderr)         # says what would do
            self.assertEqual(proc.stdout, "")
        self.assertEqual(self.daemon.call(op="list")["total"], 1)


class JsonAlwaysOneDocumentTest(EverydayCase):

    def test_refusals_print_the_error_reply(self):
        for args, code, error in ((("show", "999"), 2, "not_found"),
                                  (("cancel", "999"), 2, "not_found"),
                                  (("retry", "999"), 2, "not_found"),
                                  (("wait", "999"), 2, "not_found"),
                                  (("logs", "999"), 2, "not_found"),
                                  (("add", "os:system", "true"), 2, "not_allowed"),
                                  (("list", "--limit", "0"), 2, "bad_request"),
                                  (("frobnicate",), 2, "bad_request"),
                                  (("add", "T", "--delay", "soon"), 2, "bad_request")):
            with self.subTest(args=args):
                proc = self.ctl("--json", *args, code=code)
                doc = json.loads(proc.stdout)
                self.assertEqual((doc["ok"], doc["error"]["code"], sorted(doc)),
                                 (False, error, ["error", "ok"]))
                self.assertEqual(proc.stdout.count("\n"), 1)
                self.assertTrue(proc.stderr.strip())

    def test_several_ids_print_an_array_in_order(self):
        a, b = self.add_many(2)
        doc = self.ctl_json("cancel", str(a), "999", str(b), code=2)
        self.assertEqual([d.get("job", {}).get("id") for d in doc], [a, None, b])
        self.assertEqual((doc[1]["ok"], doc[1]["error"]["code"], doc[1]["id"]), (False, "not_found", 999))

    def test_an_unreachable_daemon_is_one_document_too(self):
        proc = subprocess.run([sys.executable, JOBCTL, "--socket", self.daemon.socket + ".none",
                               "--json", "stats"], capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 3)
        self.assertEqual(json.loads(proc.stdout)["error"]["code"], "unreachable")


class CompletionAndVersionTest(EverydayCase):

    def complete(self, script, *words):
        """What bash completes for the command line `words` (the last one being typed)."""
        words = ["jobctl", *words]
        program = "%s\nCOMP_WORDS=(%s); COMP_CWORD=%d; _jobctl; printf '%%s\\n' \"${COMPREPLY[@]}\"" % (
            script, " ".join("'%s'" % w for w in words), len(words) - 1)
        proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", program],
                              capture_output=True, text=True, timeout=30)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc.stdout.split()

    def test_bash_completes_commands_flags_and_values(self):
        script = self.ctl("completion", "bash").stdout
        self.assertIn("list", self.complete(script, "li"))
        self.assertEqual(self.complete(script, "list", "--sta"), ["--state"])
        self.assertIn("--before-id", self.complete(script, "list", "--be"))
        self.assertEqual(self.complete(script, "--json", "list", "--state", "fa"), ["failed"])
        self.assertIn("--retry-delay", self.complete(script, "add", "T", "--re"))
        self.assertEqual(self.complete(script, "completion", "z"), ["zsh"])
        self.assertIn("--version", self.complete(script, "--v"))

    def test_zsh_script_loads_the_same_through_bashcompinit(self):
        script = self.ctl("completion", "zsh").stdout
        self.assertIn("bashcompinit", script)
        self.assertIn("_jobctl()", script)
        self.assertEqual(subprocess.run(["bash", "-n", "-c", script]).returncode, 0)
        self.ctl("completion", "fish", code=2)

    def test_zsh_registers_it_and_completes_through_it(self):
        # zsh's own matching filters the words (bashcompinit's compgen gives them all), so
        # this checks that jobctl is registered and that the function sees the command line
        # as zsh hands it over (sh emulation: arrays from 0).
        import shutil
        if shutil.which("zsh") is None:
            self.skipTest("zsh is not installed")
        script = self.ctl("completion", "zsh").stdout
        program = ('autoload -U compinit && compinit -u -D; eval "$SCRIPT"; '
                   'print -r -- "${_comps[jobctl]}"; '
                   'emulate sh -c \'COMP_WORDS=(jobctl list --state fa); COMP_CWORD=3; _jobctl; '
                   'echo "${COMPREPLY[@]}"; COMP_WORDS=(jobctl --json li); COMP_CWORD=2; '
                   '_jobctl; echo "${COMPREPLY[@]}"\'')
        proc = subprocess.run(["zsh", "-f", "-c", program], capture_output=True, text=True,
                              timeout=30, env={**os.environ, "SCRIPT": script})
        self.assertEqual(proc.returncode, 0, proc.stderr)
        registered, states, commands = proc.stdout.splitlines()
        self.assertEqual(registered, "_bash_complete -F _jobctl")
        self.assertIn("failed", states.split())
        self.assertIn("list", commands.split())

    def test_version_needs_no_daemon(self):
        for argv in (["--version"], ["list", "--version"]):
            proc = subprocess.run([sys.executable, JOBCTL, "--socket", "/nonexistent", *argv],
                                  capture_output=True, text=True, timeout=60)
            self.assertEqual((proc.returncode, proc.stdout), (0, "jobctl %s\n" % jr.VERSION))
        self.assertEqual(jobctl.__version__, jr.VERSION)


####################################################################################################
# Python older than 3.11: one line, exit 2, before any 3.11-only syntax or import
####################################################################################################

# Runs a file as __main__ with sys.version_info faked: what the file's own first lines do on an
# older Python (the rest of the file is compiled by this one, so this tests the check's code and
# its place, not an old interpreter).
FAKE_OLD = """
import runpy, sys
sys.version_info = (3, 10, 12, "final", 0)
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class OldPythonTest(unittest.TestCase):

    FILES = (("jobctl.py", ["stats"]), ("jobrunnerd.py", ["--check-config"]),
             ("jobctl", ["--version"]))

    def test_each_program_says_what_it_needs_in_one_line_and_exits_2(self):
        for name, args in self.FILES:
            with self.subTest(name=name):
                proc = subprocess.run([sys.executable, "-c", FAKE_OLD, os.path.join(ROOT, name),
                                       *args], capture_output=True, text=True, timeout=60,
                                      cwd=ROOT)
                self.assertEqual(proc.returncode, 2, proc.stderr)
                self.assertEqual(proc.stdout, "")
                lines = proc.stderr.splitlines()
                self.assertEqual(len(lines), 1, proc.stderr)
                self.assertRegex(lines[0], r"^(jobctl|jobrunnerd): needs Python 3\.11 or newer; "
                                           r"found Python 3\.10\.12 \(.+\)$")
                self.assertNotIn("Traceback", proc.stderr)

    def test_real_older_pythons_get_the_line_too(self):
        # Where older interpreters are installed (pyenv's versions, or $JOBRUNNER_OLD_PYTHONS:
        # paths separated by ":"), each program is run by them for real. 3.7 to 3.10 parse
        # both files; the `jobctl` launcher checks first, so it also covers 2.7 to 3.6.
        import glob
        listed = os.environ.get("JOBRUNNER_OLD_PYTHONS")
        root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
        found = listed.split(":") if listed else sorted(
            glob.glob(os.path.join(root, "versions", "3.[789].*", "bin", "python"))
            + glob.glob(os.path.join(root, "versions", "3.10.*", "bin", "python")))
        if not found:
            self.skipTest("no Python 3.7-3.10 installed here")
        for python in found:
            for name, args in self.FILES:
                with self.subTest(python=python, name=name):
                    proc = subprocess.run([python, os.path.join(ROOT, name), *args],
                                          capture_output=True, text=True, timeout=60, cwd=ROOT)
                    self.assertEqual(proc.returncode, 2, proc.stderr)
                    self.assertRegex(proc.stderr, r"\A(jobctl|jobrunnerd): needs Python 3\.11 or "
                                                  r"newer; found Python 3\.\d+\.\d+ \(.+\)\n\Z")
        for python in sorted(glob.glob(os.path.join(root, "versions", "[23].[0-6].*", "bin",
                                                     "python"))) if not listed else ():
            with self.subTest(python=python, name="jobctl"):
                proc = subprocess.run([python, os.path.join(ROOT, "jobctl"), "stats"],
                                      capture_output=True, text=True, timeout=60, cwd=ROOT)
                self.assertEqual(proc.returncode, 2, proc.stderr)
                self.assertRegex(proc.stderr, r"\Ajobctl: needs Python 3\.11 or newer; found "
                                              r"Python [23]\.\d+\.\d+ \(.+\)\n\Z")

    def test_the_check_comes_before_every_other_statement(self):
        for name in ("jobctl.py", "jobrunnerd.py"):
            with open(os.path.join(ROOT, name)) as f:
                source = f.read()
            body = __import__("ast").parse(source).body
            kinds = [type(node).__name__ for node in body[:4]]
            self.assertEqual(kinds, ["Expr", "ImportFrom", "Import", "If"], name)   # docstring,
            self.assertEqual(body[1].module, "__future__")              # __future__, sys, check
            self.assertIn("version_info < (3, 11)", __import__("ast").unparse(body[3].test))

    def test_the_files_parse_under_the_grammar_of_python_3_7(self):
        # ast's feature_version is the nearest to an old parser there is here: it refuses the
        # syntax newer than 3.7 that it knows of (match, except*, parenthesised with-items,
        # positional-only parameters...). 3.7 is the oldest with `from __future__ import
        # annotations`, so the version check is reached from 3.7 on.
        import ast
        for name in ("jobctl.py", "jobrunnerd.py", "jobctl"):
            with open(os.path.join(ROOT, name)) as f:
                ast.parse(f.read(), filename=name, feature_version=(3, 7))


####################################################################################################
# not_allowed says which allow list was consulted and how to extend it
####################################################################################################

class NotAllowedMessageTest(EverydayCase):

    def test_with_a_config_file_it_names_the_file_and_the_key(self):
        proc = self.ctl("add", "os:system", "true", code=2)
        self.assertIn("not_allowed", proc.stderr)
        self.assertIn("allow = [\"examples.*:*\"] in %s" % os.path.abspath(self.daemon.config_path),
                      proc.stderr)
        self.assertIn('add a pattern that matches it (such as "os:*") to the key allow', proc.stderr)
        reply = self.daemon.call(op="add_batch", jobs=[{"target": "examples.jobs:echo"},
                                                       {"target": "os:system"}])
        self.assertEqual(reply["error"]["code"], "not_allowed")
        self.assertIn("jobs[1]: target os:system", reply["error"]["message"])
        self.assertIn(self.daemon.config_path, reply["error"]["message"])

    def test_without_one_it_says_the_defaults_are_in_use(self):
        cfg = jr.Config({}, ROOT, None)
        with self.assertRaises(jr.ProtocolError) as caught:
            jr.validate_add({"target": "os:system"}, cfg, 0.0)
        self.assertEqual(caught.exception.code, "not_allowed")
        message = str(caught.exception)
        self.assertIn('allow = ["examples.*:*"], the embedded defaults (no config file)', message)
        self.assertIn("--config FILE", message)
        cfg.allow = ["a%d.*:*" % i for i in range(500)]                 # quoted, not all of it
        with self.assertRaises(jr.ProtocolError) as caught:
            jr.validate_add({"target": "os:system"}, cfg, 0.0)
        self.assertLess(len(str(caught.exception)), 800)


####################################################################################################
# README "For the first hour": the job module and the session are replayed against a daemon
####################################################################################################

def readme_sample(name):
    """The lines of the fenced block after the README's `<!-- sample: NAME ...` marker,
    without the list item's indentation."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    at = text.index("<!-- sample: %s" % name)
    lines = text[at:].splitlines()[1:]
    fence = lines[0]
    indent = len(fence) - len(fence.lstrip())
    body = []
    for line in lines[1:]:
        if line.strip() == "```":
            return body
        body.append(line[indent:])
    raise AssertionError("README: the sample %s has no closing fence" % name)


def mask(line):
    """A line of output with what varies from run to run (times, ages, durations) masked
    and runs of spaces (column widths follow those) made one."""
    line = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", "<time>", line)
    line = re.sub(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+Z)?", "<time>", line)  # logs, top
    line = re.sub(r"\((just now|in \S+|\S+ ago)\)", "(<when>)", line)
    line = re.sub(r"(?<=\s)(just now|\S+ ago)(?=\s)", "<when>", line)       # top's WHEN
    line = re.sub(r"\bpid \d+", "pid <pid>", line)
    line = re.sub(r"finished \d+\.\d\d/s \(last minute: \d+\)", "finished <rate>", line)
    line = re.sub(r'File "[^"]*/', 'File "<dir>/', line)
    line = re.sub(r"\bline \d+, in _main", "line <n>, in _main", line)
    line = re.sub(r"(?<![\w.:])\d+(\.\d+)?(ms|s|m|h|d)\b", "<t>", line)
    return " ".join(line.split())


class ReadmeSampleTest(EverydayCase):

    config = {"allow": ["examples.*:*", "greet:*"]}

    def prepare(self):
        self.write_job_module("greet", "\n".join(readme_sample("greet.py")) + "\n")

    def test_the_first_hour_session_is_what_jobctl_prints(self):
        session = readme_sample("session")
        steps = []                              # (argv, expected output lines)
        for line in session:
            if line.startswith("$ jobctl "):
                steps.append((line[len("$ jobctl "):].split(), []))
            else:
                steps[-1][1].append(line)
        self.assertEqual([argv[0] for argv, _ in steps],
                         ["add", "add", "add", "list", "show", "logs", "top"])
        for argv, expected in steps:
            with self.subTest(argv=argv):
                code = 1 if "greet:Flaky" in argv else 0     # add --wait of a failing job
                out = self.ctl(*argv, code=code, env={"COLUMNS": "120", "NO_COLOR": ""}).stdout
                got = [mask(line) for line in out.splitlines()]
                want = [mask(line) for line in expected]
                if argv[0] == "show":
                    # Every line shown, in this order (a field added later may come between).
                    rest = iter(got)
                    missing = [line for line in want if line not in rest]
                    self.assertEqual(missing, [], out)
                else:
                    self.assertEqual(got, want, out)
