"""Metrics (SPEC §7), the `metrics` op, `metrics_listen` (§5), `jobctl metrics` and `jobctl top`
(§4), and the `activity` op that top reads (issue #16, items 3 and 4).

The text format is checked by a strict parser of the exposition format 0.0.4 written here with
the standard library (parse_exposition): every family has # HELP then # TYPE before its samples,
samples are contiguous per family and named after it, label values are escaped, histograms are
cumulative with a +Inf bucket equal to _count.
"""
import fcntl
import json
import math
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import unittest

from tests import support
from tests.support import (DaemonTestCase, JOBCTL, ROOT, Raw, wait_until)
from tests.test_durability import InProcessDaemonCase
import jobrunnerd as jr
import jobctl

TARGET = "examples.jobs:ExampleJob"
SLOW = "examples.jobs:DelayedJob"
FAILING = "examples.jobs:ErrorJob"
SOCKET_BOUND = 1.0          # s: a socket client is answered this soon whatever HTTP clients do

####################################################################################################
#  A strict parser of the text exposition format 0.0.4
####################################################################################################

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE_RE = re.compile(r"(%s)(?:\{(.*)\})? (\S+)(?: (-?\d+))?\Z" % NAME)
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|\Z)')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_value(text):
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", text):
        raise ValueError("bad value %r" % text)
    return float(text)


def parse_labels(text):
    labels, pos = {}, 0
    while pos < len(text):
        m = LABEL_RE.match(text, pos)
        if not m:
            raise ValueError("bad labels %r at %d" % (text, pos))
        name = m.group(1)
        if name in labels:
            raise ValueError("label %s twice" % name)
        labels[name] = re.sub(r'\\(.)', lambda e: {"n": "\n"}.get(e.group(1), e.group(1)),
                              m.group(2))
        pos = m.end()
        if m.group(3) == "," and pos == len(text):
            raise ValueError("trailing comma in %r" % text)
    return labels


def parse_exposition(text):
    """{family: {"help", "type", "samples": [(name, labels, value)]}}; ValueError if anything
    is not strictly the format."""
    if not text.endswith("\n"):
        raise ValueError("the text must end with a newline")
    families, current, seen = {}, None, set()
    for n, line in enumerate(text[:-1].split("\n"), 1):
        where = "line %d: %r" % (n, line)
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) < 3 or parts[0] != "#" or parts[1] not in ("HELP", "TYPE"):
                raise ValueError("comment lines are only HELP and TYPE here: " + where)
            name = parts[2]
            if not re.fullmatch(NAME, name):
                raise ValueError("bad family name: " + where)
            if parts[1] == "HELP":
                if name in families:
                    raise ValueError("HELP twice or after samples: " + where)
                if len(parts) != 4 or not parts[3].strip():
                    raise ValueError("empty HELP: " + where)
                families[name] = {"help": parts[3], "type": None, "samples": []}
                current = name
            else:
                if current != name or families[name]["type"] is not None \
                        or families[name]["samples"]:
                    raise ValueError("TYPE must follow its HELP, before samples: " + where)
                if len(parts) != 4 or parts[3] not in TYPES:
                    raise ValueError("bad TYPE: " + where)
                families[name]["type"] = parts[3]
            continue
        if not line:
            raise ValueError("empty line: " + where)
        m = SAMPLE_RE.match(line)
        if not m:
            raise ValueError("not a sample: " + where)
        name, labels, value = m.group(1), parse_labels(m.group(2) or ""), parse_value(m.group(3))
        family = families.get(current)
        if family is None or family["type"] is None:
            raise ValueError("sample before its HELP and TYPE: " + where)
        allowed = {current}
        if family["type"] == "histogram":
            allowed = {current + "_bucket", current + "_sum", current + "_count"}
        if name not in allowed:
            raise ValueError("sample of another family (%s) inside %s: %s"
                             % (name, current, where))
        key = (name, tuple(sorted(labels.items())))
        if key in seen:
            raise ValueError("duplicate sample: " + where)
        seen.add(key)
        family["samples"].append((name, labels, value))
    for name, family in families.items():
        if family["type"] is None:
            raise ValueError("family %s has no TYPE" % name)
        if family["type"] == "histogram":
            check_histogram(name, family["samples"])
    return families


def check_histogram(name, samples):
    series = {}
    for sample, labels, value in samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        entry = series.setdefault(key, {"buckets": [], "sum": None, "count": None})
        if sample.endswith("_bucket"):
            entry["buckets"].append((parse_value(labels["le"]), value))
        else:
            entry[sample.rsplit("_", 1)[1]] = value
    for key, entry in series.items():
        bounds = [b for b, _ in entry["buckets"]]
        if bounds != sorted(bounds) or not bounds or bounds[-1] != math.inf:
            raise ValueError("%s%s: buckets not ascending to +Inf" % (name, key))
        counts = [c for _, c in entry["buckets"]]
        if counts != sorted(counts):
            raise ValueError("%s%s: buckets not cumulative" % (name, key))
        if entry["count"] != counts[-1] or entry["sum"] is None:
            raise ValueError("%s%s: _count must equal the +Inf bucket" % (name, key))


def value(families, family, sample=None, **labels):
    for name, got, v in families[family]["samples"]:
        if name == (sample or family) and got == labels:
            return v
    raise KeyError((family, sample, labels))


SPEC_FAMILIES = {
    "jobrunner_jobs": "gauge", "jobrunner_running": "gauge", "jobrunner_workers": "gauge",
    "jobrunner_attempts_total": "counter", "jobrunner_enqueued_total": "counter",
    "jobrunner_attempt_duration_seconds": "histogram",
    "jobrunner_queue_wait_seconds": "histogram",
    "jobrunner_schedule_next_run_timestamp_seconds": "gauge",
    "jobrunner_uptime_seconds": "gauge", "jobrunner_journal_bytes": "gauge",
}


class ParserTest(unittest.TestCase):
    """The parser is strict: each of these is refused."""

    GOOD = ("# HELP a_total Things.\n# TYPE a_total counter\na_total{q=\"x\\\"y\"} 3\n")

    def test_good_text_parses(self):
        fams = parse_exposition(self.GOOD)
        self.assertEqual(fams["a_total"]["samples"], [("a_total", {"q": 'x"y'}, 3.0)])

    def test_bad_texts_are_refused(self):
        for bad in (
                "# TYPE a counter\na 1\n",                       # no HELP
                "# HELP a x\na 1\n",                             # no TYPE
                "# HELP a x\n# TYPE a counter\na 1",             # no final newline
                "# HELP a x\n# TYPE a counter\nb 1\n",           # another family's sample
                "# HELP a x\n# TYPE a counter\na{q=\"x\ny\"} 1\n",   # raw newline in a label
                "# HELP a x\n# TYPE a counter\na{q=\"x\\t\"} 1\n",   # unknown escape
                "# HELP a x\n# TYPE a counter\na 1\na 2\n",      # duplicate
                "# HELP a x\n# TYPE a counter\na one\n",         # not a number
                "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\n"
                "h_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",  # not cumulative
        ):
            with self.subTest(text=bad):
                with self.assertRaises(ValueError):
                    parse_exposition(bad)


####################################################################################################
#  Units: the outcome rule, the histogram, the rate, escaping
####################################################################################################

class Clock:
    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


class MetricsUnitTest(unittest.TestCase):

    def job(self, queue="default", job_id=1):
        job = jr.Job({"target": TARGET, "queue": queue})
        job.id, job.run_at, job.attempts, job.retries = job_id, 100.0, 1, 1
        job.retry_delay, job.backoff = 1.0, "fixed"
        return job

    def test_outcome_rule_of_spec_7(self):
        job = self.job()
        cases = [
            (jr.Ending(jr.ENDED_OK), False, "succeeded"),
            (jr.Ending(jr.ENDED_ERROR, 1, "boom"), False, "retried"),     # a retry is left
            (jr.Ending(jr.ENDED_ERROR, 1, "boom"), True, "timed_out"),    # timeout wins
            (jr.Ending(jr.ENDED_PERMANENT, 1, "boom"), False, "failed"),  # no retry
            (jr.Ending(jr.ENDED_SHUTDOWN, -15), False, "interrupted"),
            (jr.Ending(jr.ENDED_INTERRUPTED), False, "interrupted"),
        ]
        for ending, timed_out, expected in cases:
            with self.subTest(ending=ending.how, timed_out=timed_out):
                out = jr.attempt_outcome(job, ending, 200.0, 3600)
                self.assertEqual(jr.attempt_metric_outcome(ending, out, timed_out), expected)
        job.attempts = 2                        # the last attempt: a failure is final
        ending = jr.Ending(jr.ENDED_ERROR, 1, "boom")
        out = jr.attempt_outcome(job, ending, 200.0, 3600)
        self.assertEqual(jr.attempt_metric_outcome(ending, out, False), "failed")

    def test_buckets_from_a_millisecond_to_an_hour(self):
        self.assertEqual(jr.METRIC_BUCKETS[0], 0.001)
        self.assertEqual(jr.METRIC_BUCKETS[-1], 3600.0)
        hist = jr.Histogram()
        for v in (0.0005, 0.001, 0.002, 7200.0):
            hist.observe(v)
        self.assertEqual(hist.counts[0], 2)         # le="0.001" holds 0.001 itself
        self.assertEqual(hist.counts[-1], 1)        # past an hour: +Inf only
        self.assertEqual(hist.count, 4)

    def test_finished_per_second_over_the_last_minute(self):
        clock = Clock()
        m = jr.Metrics(clock)
        m.finished(30)
        clock.t += 30
        m.finished(60)
        self.assertEqual(m.finished_last_minute(), 90)
        clock.t += 31                           # the first 30 are past the minute now
        self.assertEqual(m.finished_last_minute(), 60)
        clock.t += 3600                         # a slot reused an hour later starts at 0
        m.finished(1)
        self.assertEqual(m.finished_last_minute(), 1)

    def test_render_escapes_label_values_and_parses_strictly(self):
        clock = Clock()
        m = jr.Metrics(clock)
        job = self.job("mail.q-1")
        m.attempt_started(job, 100.5)
        m.attempt_ended(job, "retried", 0.25, "boom")
        m.enqueued([job] * 3)                  # three jobs of queue mail.q-1 written
        queue = jr.Queue("mail.q-1", 4)
        queue.counts["pending"] = 7
        odd = 'we"ird\\name\nx'
        text = m.render([jr.Queue("default", 2), queue], 12.5, 4096, [(odd, 1234.5)])
        fams = parse_exposition(text)
        for name, kind in SPEC_FAMILIES.items():
            self.assertEqual(fams[name]["type"], kind, name)
        self.assertEqual(value(fams, "jobrunner_schedule_next_run_timestamp_seconds",
                               schedule=odd), 1234.5)
        self.assertEqual(value(fams, "jobrunner_jobs", queue="mail.q-1", state="pending"), 7)
        self.assertEqual(value(fams, "jobrunner_workers", queue="mail.q-1"), 4)
        self.assertEqual(value(fams, "jobrunner_attempts_total", queue="mail.q-1",
                               outcome="retried"), 1)
        self.assertEqual(value(fams, "jobrunner_attempts_total", queue="default",
                               outcome="retried"), 0)
        self.assertEqual(value(fams, "jobrunner_enqueued_total", queue="mail.q-1"), 3)
        self.assertEqual(value(fams, "jobrunner_queue_wait_seconds", "jobrunner_queue_wait"
                               "_seconds_bucket", queue="mail.q-1", le="0.25"), 0)
        self.assertEqual(value(fams, "jobrunner_queue_wait_seconds", "jobrunner_queue_wait"
                               "_seconds_bucket", queue="mail.q-1", le="0.5"), 1)
        self.assertEqual(value(fams, "jobrunner_attempt_duration_seconds",
                               "jobrunner_attempt_duration_seconds_sum", queue="mail.q-1"), 0.25)
        self.assertEqual(value(fams, "jobrunner_uptime_seconds"), 12.5)
        self.assertEqual(value(fams, "jobrunner_journal_bytes"), 4096)
        self.assertEqual(list(m.failures)[0]["error"], "boom")


####################################################################################################
#  End to end: the metrics op and jobctl metrics
####################################################################################################

class MetricsEndToEndTest(DaemonTestCase):
    config = {"workers": 2, "queues": {"emails": {"workers": 1}}}

    def metrics(self):
        reply = self.daemon.call(op="metrics")
        self.assertTrue(reply["ok"], reply)
        return parse_exposition(reply["text"])

    def test_counters_follow_attempts_and_adds(self):
        d = self.daemon
        ok = d.add(TARGET, args=["a"])
        flaky = d.add(FAILING, retries=1, retry_delay=0.01)
        slow = d.add(SLOW, args=[30], timeout=1.0)
        victim = d.add(SLOW, args=[30], queue="emails")
        for job_id in (ok, flaky, slow):
            d.wait_job(job_id)
        d.wait_state(victim, "running")
        self.assertTrue(d.call(op="cancel", id=victim)["ok"])
        batch = d.call(op="add_batch", jobs=[{"target": TARGET, "queue": "emails",
                                               "delay": 3600}] * 2)
        self.assertTrue(batch["ok"], batch)
        self.assertTrue(d.call(op="retry", id=flaky)["ok"])
        d.wait_job(flaky)

        def cancel_counted():
            fams = self.metrics()
            return value(fams, "jobrunner_attempts_total", queue="emails",
                         outcome="cancelled") == 1 and fams
        fams = wait_until(cancel_counted, message="the cancelled attempt to be counted")
        for name, kind in SPEC_FAMILIES.items():
            self.assertEqual(fams[name]["type"], kind, name)
        expected = {("default", "succeeded"): 1, ("default", "retried"): 2,
                    ("default", "failed"): 2, ("default", "timed_out"): 1,
                    ("default", "cancelled"): 0, ("default", "interrupted"): 0,
                    ("emails", "cancelled"): 1, ("emails", "succeeded"): 0}
        for (queue, outcome), n in expected.items():
            self.assertEqual(value(fams, "jobrunner_attempts_total", queue=queue,
                                   outcome=outcome), n, (queue, outcome))
        self.assertEqual(value(fams, "jobrunner_enqueued_total", queue="default"), 4)
        self.assertEqual(value(fams, "jobrunner_enqueued_total", queue="emails"), 3)
        self.assertEqual(value(fams, "jobrunner_jobs", queue="default", state="failed"), 2)
        self.assertEqual(value(fams, "jobrunner_jobs", queue="default", state="succeeded"), 1)
        self.assertEqual(value(fams, "jobrunner_jobs", queue="emails", state="pending"), 2)
        self.assertEqual(value(fams, "jobrunner_jobs", queue="emails", state="cancelled"), 1)
        self.assertEqual(value(fams, "jobrunner_workers", queue="emails"), 1)
        self.assertEqual(value(fams, "jobrunner_running", queue="emails"), 0)
        duration = "jobrunner_attempt_duration_seconds"
        self.assertEqual(value(fams, duration, duration + "_count", queue="default"), 6)
        self.assertGreaterEqual(value(fams, duration, duration + "_sum", queue="default"), 1.0)
        wait = "jobrunner_queue_wait_seconds"
        self.assertEqual(value(fams, wait, wait + "_count", queue="default"), 6)
        self.assertEqual(value(fams, wait, wait + "_count", queue="emails"), 1)
        self.assertGreater(value(fams, "jobrunner_uptime_seconds"), 0)
        self.assertGreater(value(fams, "jobrunner_journal_bytes"), 0)
        # jobctl metrics prints the same text; --json wraps it in one document
        out = d.jobctl("metrics")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(parse_exposition(out.stdout).keys(), fams.keys())
        out = d.jobctl("--json", "metrics")
        self.assertEqual(out.returncode, 0, out.stderr)
        parse_exposition(json.loads(out.stdout)["text"])

    def test_running_gauge_and_activity(self):
        d = self.daemon
        job_id = d.add(SLOW, args=[30], queue="emails")
        self.addCleanup(lambda: d.call(op="cancel", id=job_id))   # (a quick stop after)
        d.wait_state(job_id, "running")
        fams = self.metrics()
        self.assertEqual(value(fams, "jobrunner_running", queue="emails"), 1)
        self.assertEqual(value(fams, "jobrunner_jobs", queue="emails", state="running"), 1)
        failed = d.add(FAILING)
        d.wait_job(failed)
        act = d.call(op="activity")
        self.assertTrue(act["ok"], act)
        self.assertEqual(act["running_total"], 1)
        self.assertEqual([(j["id"], j["queue"], j["target"]) for j in act["running"]],
                         [(job_id, "emails", SLOW)])
        self.assertIsInstance(act["running"][0]["started_at"], float)
        self.assertEqual(act["failures"][0]["id"], failed)
        self.assertEqual(act["failures"][0]["outcome"], "failed")
        self.assertIn("RuntimeError", act["failures"][0]["error"])
        self.assertEqual(act["finished_last_minute"], 1)
        self.assertGreater(act["finished_per_second"], 0)
        self.assertEqual(d.call(op="activity", extra=1)["error"]["code"], "bad_request")
        self.assertEqual(d.call(op="metrics", extra=1)["error"]["code"], "bad_request")

    def test_an_attempt_a_crash_left_running_counts_as_interrupted(self):
        d = self.daemon
        job_id = d.add(SLOW, args=[30], retries=1)
        d.wait_state(job_id, "running")
        d.kill()
        d.start()
        fams = self.metrics()
        self.assertEqual(value(fams, "jobrunner_attempts_total", queue="default",
                               outcome="interrupted"), 1)
        self.assertEqual(value(fams, "jobrunner_enqueued_total", queue="default"), 0)
        d.call(op="cancel", id=job_id)


class MetricsUndoTest(InProcessDaemonCase):
    """An add refused with io_error (its change undone) is not counted as enqueued."""

    def test_refused_add_is_not_counted(self):
        import errno
        from unittest import mock
        eio = OSError(errno.EIO, "injected EIO")
        with mock.patch.object(jr.os, "fdatasync", side_effect=eio), \
                mock.patch.object(jr.os, "fsync", side_effect=eio):
            reply = self.call(op="add", target=TARGET, delay=3600)
            self.assertEqual(reply["error"]["code"], "io_error", reply)
            batch = self.call(op="add_batch", jobs=[{"target": TARGET, "delay": 3600}])
            self.assertEqual(batch["error"]["code"], "io_error", batch)
        fams = parse_exposition(self.call(op="metrics")["text"])
        self.assertEqual(value(fams, "jobrunner_enqueued_total", queue="default"), 0)
        # (the store repairs itself with a snapshot, at most once a second)
        wait_until(lambda: self.call(op="add", target=TARGET, delay=3600)["ok"], 10,
                   message="an add to work again")
        fams = parse_exposition(self.call(op="metrics")["text"])
        self.assertEqual(value(fams, "jobrunner_enqueued_total", queue="default"), 1)
        self.assertEqual(value(fams, "jobrunner_jobs", queue="default", state="pending"), 1)


####################################################################################################
#  metrics_listen: GET /metrics from the daemon's own loop
####################################################################################################

def http_get(port, request=b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5.0):
    """(status, headers, body) of one request."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def scrape_status(port):
    """The status of GET /metrics, or "reset" when the daemon refused it by a reset."""
    try:
        return http_get(port)[0]
    except (ConnectionResetError, BrokenPipeError):
        return "reset"


class MetricsHTTPTest(DaemonTestCase):
    config = {"metrics_listen": "127.0.0.1:0", "max_connections": 8}
    # A short connection deadline, so that the test sees an idle client dropped.
    daemon_preamble = "jr.METRICS_HTTP_TIMEOUT = 1.0"

    def port(self):
        startup = [e for e in self.daemon.events() if e["event"] == "startup"][-1]
        return int(startup["metrics"].rpartition(":")[2])

    def assert_socket_prompt(self):
        t0 = time.monotonic()
        with self.daemon.raw(timeout=5) as c:
            self.assertTrue(c.call(op="hello")["ok"])
        self.assertLess(time.monotonic() - t0, SOCKET_BOUND)

    def test_get_metrics_and_other_paths(self):
        self.daemon.add(TARGET, delay=3600)
        status, headers, body = http_get(self.port())
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"].split(";")[:2], ["text/plain", " version=0.0.4"])
        self.assertEqual(int(headers["content-length"]), len(body))
        fams = parse_exposition(body.decode("utf-8"))
        self.assertEqual(set(SPEC_FAMILIES) - set(fams), set())
        self.assertEqual(value(fams, "jobrunner_jobs", queue="default", state="pending"), 1)
        self.assertEqual(http_get(self.port(), b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")[0], 200)
        self.assertEqual(http_get(self.port(), b"GET / HTTP/1.1\r\n\r\n")[0], 404)
        self.assertEqual(http_get(self.port(), b"GET /metricsx HTTP/1.1\r\n\r\n")[0], 404)
        self.assertEqual(http_get(self.port(), b"POST /metrics HTTP/1.1\r\n\r\n")[0], 405)
        self.assertEqual(http_get(self.port(), b"nonsense\r\n\r\n")[0], 400)
        status, headers, body = http_get(self.port(), b"HEAD /metrics HTTP/1.1\r\n\r\n")
        self.assertEqual((status, body), (200, b""))

    def test_slow_idle_flooding_and_huge_clients_never_delay_socket_clients(self):
        port = self.port()
        idle = socket.create_connection(("127.0.0.1", port))
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET /met")                        # and never the rest
        flood = []
        for _ in range(60):                              # past the cap of 16
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            flood.append(s)
        self.assert_socket_prompt()
        huge = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            huge.sendall(b"GET /" + b"a" * (jr.METRICS_HTTP_MAX_HEAD + 10))
        except OSError:
            pass                                         # closed on us already: fine
        self.assert_socket_prompt()
        reply = b""
        try:
            while True:
                chunk = huge.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except OSError:
            pass
        self.assertTrue(reply == b"" or reply.startswith(b"HTTP/1.1 431") or
                        reply.startswith(b"HTTP/1.1 503"), reply[:80])
        huge.close()
        # The idle and slow clients are dropped at their deadline (1 s here).
        for s in (idle, slow):
            s.settimeout(10)
            self.assertEqual(s.recv(100), b"", "an idle HTTP client was not dropped")
            s.close()
        for s in flood:
            s.close()
        # Once the flood is gone, a scrape works again.
        status = wait_until(lambda: scrape_status(self.port()) == 200, 10,
                            message="a scrape to work after the flood")
        self.assertTrue(status)
        self.assert_socket_prompt()

    def test_over_the_cap_is_told_503(self):
        port = self.port()
        held = [socket.create_connection(("127.0.0.1", port))
                for _ in range(jr.METRICS_HTTP_MAX_CONNECTIONS)]
        self.assert_socket_prompt()                     # (the daemon has accepted them all)
        try:
            # Told 503, or (its request not yet in when it was refused) reset: never served.
            try:
                status, _, _ = http_get(port)
            except ConnectionResetError:
                status = "reset"
            self.assertIn(status, (503, "reset"))
        finally:
            for s in held:
                s.close()
        wait_until(lambda: scrape_status(port) == 200, 10, message="a scrape after the cap")


class MetricsHTTPUnitTest(unittest.TestCase):

    def test_no_free_fd_stops_watching_the_listener_instead_of_spinning(self):
        import errno
        loop = jr.Loop()
        self.addCleanup(loop.sel.close)
        http = jr.MetricsHTTP("127.0.0.1:0", loop, lambda: "")
        http.open()
        self.addCleanup(http.close)
        real = http.listener
        fd = real.fileno()

        class Full:
            """The listener of a process with no fd free: accept() fails, fileno() works."""
            def fileno(self):
                return fd

            def accept(self):
                raise OSError(errno.EMFILE, "Too many open files")

            def close(self):
                real.close()

        http.listener = Full()
        self.assertIn(fd, loop.watched)
        http.on_accept(1)
        self.assertNotIn(fd, loop.watched)              # a readable listener would spin
        self.assertIsNotNone(loop.next_timer())
        loop.timers[0][0] = 0                            # the retry is due
        loop.run_timers()
        self.assertIn(fd, loop.watched)                  # watched again after ACCEPT_RETRY


class MetricsListenConfigTest(unittest.TestCase):

    def test_bad_values_are_refused_at_start_up(self):
        for bad in ("localhost", "127.0.0.1:http", "127.0.0.1:70000", ":9100", 9100):
            with self.subTest(value=bad):
                with self.assertRaises(jr.ConfigError) as cm:
                    jr.Config({"metrics_listen": bad}, ROOT)
                self.assertIn("metrics_listen", str(cm.exception))
        self.assertEqual(jr.Config({"metrics_listen": "[::1]:9100"}, ROOT).metrics_listen,
                         "[::1]:9100")
        self.assertEqual(jr.split_listen("[::1]:9100"), ("::1", 9100))
        self.assertEqual(jr.Config({}, ROOT).metrics_listen, "")


####################################################################################################
#  jobctl top
####################################################################################################

def run_in_pty(argv, env, until, keys=b"", resize=None, timeout=20.0):
    """Run argv with stdin/stdout/stderr on a pty; read until `until` (bytes) was seen, then
    optionally resize the window and wait for `until` again, then type `keys`. Returns
    (exit status, everything read)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True,   # the pty as its controlling terminal
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout

    def read_until(marker, start):
        nonlocal out
        while marker not in out[start:]:
            if time.monotonic() > deadline or proc.poll() is not None and not \
                    select.select([master], [], [], 0)[0]:
                return False
            if select.select([master], [], [], 0.1)[0]:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    return False
        return True

    try:
        seen = read_until(until, 0)
        if seen and resize:
            mark = len(out)
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", *resize, 0, 0))
            os.killpg(proc.pid, signal.SIGWINCH)
            seen = read_until(until, mark)
        if keys:
            os.write(master, keys)
        try:
            status = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = None
        while select.select([master], [], [], 0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return status, out, seen
    finally:
        os.close(master)


class TopTest(DaemonTestCase):
    config = {"workers": 2, "queues": {"emails": {"workers": 1}}}

    def busy(self):
        d = self.daemon
        running = d.add(SLOW, args=[30], queue="emails")
        # stopped before the daemon is, so that its stop does not wait shutdown_grace
        self.addCleanup(lambda: d.call(op="cancel", id=running))
        failed = d.add(FAILING, args=["\x1b[31mred"])
        d.wait_state(running, "running")
        d.wait_job(failed)
        self.assertTrue(d.call(op="pause", queue="emails")["ok"])
        return running, failed

    def test_once_prints_one_plain_frame(self):
        running, failed = self.busy()
        out = self.daemon.jobctl("top", "--once")
        self.assertEqual(out.returncode, 0, out.stderr)
        text = out.stdout
        self.assertNotIn("\x1b", text)                  # not a terminal: no escape at all
        lines = text.splitlines()
        header = next(line for line in lines if line.startswith("QUEUE"))
        self.assertEqual(header.split(), ["QUEUE", "SLOTS", "PAUSED", "BLOCKED", "PENDING",
                                          "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"])
        emails = next(line for line in lines if line.startswith("emails")).split()
        self.assertEqual(emails[:3], ["emails", "1/1", "yes"])
        self.assertEqual(emails[5], "1")               # running
        default = next(line for line in lines if line.startswith("default")).split()
        self.assertEqual(default[:2], ["default", "0/2"])
        self.assertEqual(default[7], "1")              # failed
        self.assertIn("RUNNING (1)", text)
        row = next(line for line in lines if line.split()[:1] == [str(running)])
        self.assertIn(SLOW, row)
        self.assertRegex(row, r"\d+s")                  # elapsed
        self.assertIn("LATEST FAILURES", text)
        row = next(line for line in lines if line.split()[:1] == [str(failed)])
        self.assertIn("RuntimeError", row)
        self.assertIn("finished", lines[0])
        self.assertIn("NEXT SCHEDULE FIRES", text)
        self.assertIn("NEXT SCHEDULE FIRES\n  none declared", text)    # none in its config
        out = self.daemon.jobctl("--json", "top")
        doc = json.loads(out.stdout)
        self.assertEqual(doc["activity"]["running"][0]["id"], running)

    def test_once_on_a_terminal_has_colour_unless_no_color(self):
        self.busy()
        argv = [sys.executable, JOBCTL, "--socket", self.daemon.socket, "top", "--once"]
        env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
        env["TERM"] = "xterm"
        status, out, seen = run_in_pty(argv, env, b"NEXT SCHEDULE FIRES")
        self.assertEqual(status, 0, out)
        self.assertIn(b"\x1b[", out)
        status, out, seen = run_in_pty(argv, {**env, "NO_COLOR": "1"}, b"NEXT SCHEDULE FIRES")
        self.assertEqual(status, 0, out)
        self.assertNotIn(b"\x1b", out)
        self.assertIn(b"LATEST FAILURES", out)

    def test_live_view_redraws_survives_a_resize_and_quits_on_q(self):
        self.busy()
        env = {**os.environ, "TERM": "xterm", "NO_COLOR": "1"}
        argv = [sys.executable, JOBCTL, "--socket", self.daemon.socket, "top",
                "--interval", "0.2"]
        t0 = time.monotonic()
        status, out, seen = run_in_pty(argv, env, b"LATEST FAILURES", keys=b"q",
                                       resize=(20, 60))
        self.assertTrue(seen, out[-2000:])
        self.assertEqual(status, 0, out[-2000:])
        self.assertLess(time.monotonic() - t0, 15)
        self.assertNotIn(b"Traceback", out)

    def test_live_view_ends_on_ctrl_c(self):
        env = {**os.environ, "TERM": "xterm"}
        argv = [sys.executable, JOBCTL, "--socket", self.daemon.socket, "top"]
        status, out, seen = run_in_pty(argv, env, b"QUEUE", keys=b"\x03")
        self.assertTrue(seen, out[-2000:])
        self.assertEqual(status, 0, out[-2000:])
        self.assertNotIn(b"Traceback", out)

    def test_unreachable_daemon(self):
        out = subprocess.run([sys.executable, JOBCTL, "--socket",
                              os.path.join(self.root, "nobody.sock"), "top", "--once"],
                             capture_output=True, text=True, timeout=30)
        self.assertEqual(out.returncode, 3, out)
        self.assertNotIn("Traceback", out.stderr)


class TopUnitTest(unittest.TestCase):

    def snapshot(self, running=1, target=SLOW):
        now = 1_000_000.0
        return {
            "stats": {"uptime": 65.0, "paused": True},
            "queues": [{"name": "default", "running": 1, "workers": 2, "paused": False,
                        "declared": True, "counts": {"pending": 3, "failed": 1}}],
            "activity": {"running": [{"id": i, "queue": "default", "target": target,
                                      "method": None, "started_at": now - 75}
                                     for i in range(1, min(running, 100) + 1)],
                         "running_total": running, "failures": [
                             {"id": 9, "queue": "default", "error": "bad\x1b[2J\nthing",
                              "outcome": "failed", "at": now - 5}],
                         "finished_per_second": 1.5, "finished_last_minute": 90},
            "schedules": [{"name": "nightly", "next_run_at": now + 120, "paused": False}],
            "schedules_error": None,
        }, now

    def test_frame(self):
        snap, now = self.snapshot(running=150, target="a.b:C\x1b]0;x")
        text = jobctl.top_plain(jobctl.top_frame(snap, now), colour=False)
        self.assertNotIn("\x1b", text)                  # user strings shown escaped
        self.assertIn("\\x1b[2J\\nthing", text)
        self.assertIn("PAUSED (whole daemon)", text)
        self.assertIn("finished 1.50/s (last minute: 90)", text)
        self.assertIn("RUNNING (150)  130 more not shown", text)
        self.assertIn("1m 15s", text)
        self.assertIn("nightly", text)
        self.assertIn("in 2m", text)
        coloured = jobctl.top_plain(jobctl.top_frame(snap, now), colour=True)
        self.assertIn("\x1b[31m", coloured)


class LightImportTest(unittest.TestCase):
    """SPEC §4: the code of top loads only when it runs; `jobctl add` never imports curses."""

    def test_other_commands_never_load_top_or_curses(self):
        for args in (["add", TARGET], ["stats"], ["metrics"], ["list"]):
            with self.subTest(args=args):
                self.assertEqual(support.jobctl_loads(("curses", "_curses"), *args), [])
        code, imported = support.jobctl_importtime("add", TARGET)
        self.assertEqual(code, 3)
        self.assertIn("socket", imported)               # (the probe sees imports at all)
        self.assertFalse({"curses", "_curses"} & imported, imported)
        # jobctl.py copied alone (SPEC §1: one file) has top too
        import shutil
        import tempfile
        with tempfile.TemporaryDirectory(prefix="jr-alone-") as alone:
            shutil.copy(JOBCTL, alone)
            out = subprocess.run([sys.executable, os.path.join(alone, "jobctl.py"), "--socket",
                                  "/nonexistent/x.sock", "top", "--once"],
                                 capture_output=True, text=True, timeout=30,
                                 env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        self.assertEqual(out.returncode, 3, out)        # it runs: the daemon is not there
        self.assertIn("/nonexistent/x.sock", out.stderr)
        self.assertNotIn("Traceback", out.stderr)


if __name__ == "__main__":
    unittest.main()
