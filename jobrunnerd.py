#!/usr/bin/env python3
"""jobrunnerd - a background job runner for one Linux host, standard library only.

The daemon keeps every job in memory, persists each change to disk before it
says "ok", listens on a Unix domain socket for newline-delimited JSON requests,
and runs each attempt of a job in a fresh child process (or, in a queue with isolation =
"reuse", in a reused worker). ../SPEC.md is the contract; this docstring is the map.

Sections, in file order
    constants ........ numbers with the reason they have that value
    errors ........... ProtocolError (code + message), ConfigError, StateError
    states ........... the job state machine: TRANSITIONS and its diagram
    Job .............. one job, as __slots__, to and from its JSON record;
                       RecordTemplates (a new job's journal line from a template per shape)
    retry policy ..... next_run_at(): the one place that decides retries;
                       attempt_outcome(): what an ended attempt makes of its job
    event log ........ background_jobs.log / background_jobs_errors.log lines
    store ............ queue.json snapshot + journal.jsonl, group commit, lock:
                       StoreLoading (start-up) and Store (writing, folding), Fold
    queue ............ Queue (slots, pause, heaps) and Scheduler (which job starts
                       next, when one is due); JobTable: every job, its indexes (also
                       parent -> children), the state writer and its bulk forms;
                       PatternQuery (a `list` pattern, in slices); BulkChange (a
                       `where` cancel/retry, in durable steps)
    job process ...... the code a child runs (sent to it, never imported here)
    runner ........... Zygote (fork server), Worker (a reused worker of an
                       isolation = "reuse" queue, or a fresh queue's spare), Runner (start attempts, capture
                       output, kill process groups), Containment (what an ended
                       attempt left behind, in any group or session)
    protocol ......... request decoding, validation, plain_add() (the common add's quick
                       route; the handlers: Protocol, below, which holds a run of pipelined
                       plain adds and creates them in one go)
    schedules ........ CronExpr (cron expressions, next fire time, DST rules), Schedule
                       and parse_schedules(): the [schedules.NAME] tables, pure
    config ........... keys, defaults, TOML loading
    daemon ........... Schedules (which schedule fires next, what a fire does to the
                       table, durable with it), Pruner (finished jobs removed in
                       durable steps), Pass (what one loop pass commits, and answers
                       after its fsync), Waiters (pending waits), Metrics (counters and
                       histograms kept as attempts start and end; the Prometheus
                       text), Dispatcher (starts attempts, settles ended ones,
                       recovery at start-up), Daemon (the selectors loop, start-up,
                       signals, systemd: wires the parts together),
                       Connections (accept, framing, pipelining, replies, limits),
                       MetricsHTTP (metrics_listen: GET /metrics, non-blocking, capped),
                       Protocol (the op_* handlers of the HANDLERS table)
    main ............. command line

One pass of the loop
    select -> signals and child events (attempts end) -> timers -> dispatch due
    jobs -> schedule fires due -> client requests (those held over, then new ones,
    PASS_REQUEST_TIME each; before an fsync, a moment's wait for other busy clients: gather) ->
    ONE journal write (+ fsync) -> replies and log
    lines go out, and attempts whose start (pid) was just written get their job
    spec. A reply that reports a change is never sent before the change is
    fsynced; if the write fails, that pass's client changes are undone and
    answered with io_error. Changes no reply waits for (attempts starting and
    ending) are written at once and fsynced within SYNC_DELAY.

Protocol (version 1), in brief
    -> {"op": "add", "target": "examples.jobs:ExampleJob", "args": ["a"]}
    <- {"ok": true, "id": 1, "created": true}
    -> {"op": "nope"}
    <- {"ok": false, "error": {"code": "unknown_op", "message": "..."}}
    Ops: hello add add_batch get list cancel retry wait output stats pause
    resume prune queues set_workers schedules trigger metrics activity update. Replies come
    in request order, so clients may pipeline.
"""

from __future__ import annotations

# Before anything that needs 3.11 (an import, a syntax, a call): one line and exit 2, never a
# traceback (SPEC section 4). ASCII and old syntax only, so that older Pythons get this far.
import sys
if sys.version_info < (3, 11):
    sys.stderr.write("jobrunnerd: needs Python 3.11 or newer; found Python %d.%d.%d (%s)\n"
                     % (tuple(sys.version_info[:3]) + (sys.executable or "python",)))
    sys.exit(2)

import bisect
import collections
import datetime
import errno
import fcntl
import fnmatch
import functools
import gc
import heapq
import json
import math
import operator
import os
import re
import select
import selectors
import signal
import socket
import stat
import struct
import time
from typing import NamedTuple

####################################################################################################
#  Constants
####################################################################################################

VERSION = "0.1.0"
PROTOCOL = 1
wall_clock = time.time                # the one reading of the wall clock (epoch seconds: job
                                      # times, log lines); each part takes a `clock` argument
                                      # defaulting to it, so tests step time instead of sleeping

MAX_RESULT_BYTES = 64 * 1024          # SPEC: a larger return value is not kept as `result`
MAX_LOG_VALUE = 2000                  # one log field; a traceback goes to the errors log instead
MAX_ERROR_CHARS = 500                 # `error` is a one-line summary, not a traceback
MAX_TRACEBACK_BYTES = 256 * 1024      # what a child may report about its failure
MAX_REPORT_BYTES = 2 * (MAX_RESULT_BYTES + MAX_TRACEBACK_BYTES)  # read from fd 3, at most: our
                                      # child's report fits; more is job code writing there
READ_CHUNK = 256 * 1024               # one recv(); large enough for a pipelined burst
MAX_PENDING_OUTPUT = 8 * 1024 * 1024  # one connection's share of max_reply_buffer, at most
MAX_LINES_PER_PASS = 1024             # per connection: one busy client cannot hold the loop
PASS_REQUEST_TIME = 0.025             # nor many: requests held over, then new ones, get this
                                      # long each per pass; the rest waits for the next pass
MAX_UNHANDLED_INPUT = 4 * READ_CHUNK  # stop reading a client whose whole requests wait their turn
ACCEPT_RETRY = 0.5                    # with no fd free: accept again this often at the latest
HANGUP_CHECK = 0.2                    # a waiting client we do not read: is it gone? (POLLHUP)
MMAP_THRESHOLD = 128 * 1024           # glibc's initial value, kept: see keep_big_blocks_apart()
MAX_DELAY = 10 * 365 * 86400.0        # further out than this is a mistake, not a schedule
MAX_RETRIES = 1000                    # more is a loop, not a retry policy
MAX_PRIORITY = 2 ** 31 - 1            # keeps priorities printable and comparable everywhere
MAX_KEY_CHARS = 1024                  # uniqueness keys are names, not payloads
MAX_AFTER = 1000                      # SPEC §2b: parents of one job, at most
MAX_OUTPUT_LIMIT = 4 * 1024 * 1024    # one `output` reply; clients page with `offset`
LIST_DEFAULT, LIST_MAX = 100, 1000    # SPEC
ALLOW_SHOWN = 300                     # a not_allowed message quotes this much of the allow list
MAX_PATTERN_CHARS = 1024              # SPEC: a `target` pattern in list, cancel or retry
QUERY_SLICE = 0.015                   # pattern queries work this long per loop pass, all of
                                      # them together: the loop is never held much longer
OUTPUT_NOTES_RESERVE = 64 * 1024      # the daemon's lines in a job's output file (attempt
                                      # headers, ends, tracebacks) count toward
                                      # max_output_bytes, but still go in past it up to this
                                      # much more: a job that filled its cap still shows why
                                      # its last attempt failed
OUTPUT_TRACEBACK_BYTES = 16 * 1024    # of a traceback, its end in the output file (the whole
                                      # is in the errors log): the last frames and the error
BULK_STEP = 10_000                    # SPEC §3: `cancel`/`retry` with `where` change at most this
                                      # many jobs per durable step (one pass: ~60 ms at 1M jobs)
SETTLE_SLICE = 2_000                  # children of ended parents settled per loop pass at most:
                                      # 10,000 at once held the loop ~140 ms at 200k jobs
BULK_SLICE = 2_000                    # a `where` that matches more than BULK_STEP (so it is in
                                      # steps anyway) takes steps of this many: 10,000 jobs in one
                                      # pass held the loop 150-280 ms in a daemon of 200k jobs
                                      # (their records encoded, the journal write, a collection)
PRUNE_INTERVAL = 60.0                 # how often finished jobs past keep_finished are removed
STATUS_INTERVAL = 2.0                 # systemd STATUS= at most this often: it is for people
STORE_FORMAT = 2                      # of queue.json and journal.jsonl: 2 adds queue pauses
                                      # (format 1, without them, loads as it is)
JOURNAL_MIN_COMPACT = 1024 * 1024     # SPEC: fold the journal once past max(this, snapshot size)
PRUNE_FOLD_SHARE = 8                  # a fold follows prunes once they deleted 1/8 of the jobs
                                      # in the snapshot (disk use stays proportional to live jobs;
                                      # one job pruned of a million is one `del` line, not 143 MiB)
PRUNE_SLICE = 1000                    # finished jobs pruned per loop pass (a durable step): ~10 ms
                                      # at 1M jobs, so a prune of 100k never holds the loop (a
                                      # request waits for up to two passes)
PRUNE_OUTPUT_SECONDS = 0.01           # per pass, deleting the output files of pruned jobs
FOLD_RETRY = 5.0                      # seconds before a failed background fold is tried again
FOLD_SYNC_EVERY = 4 * 1024 * 1024     # a fold's child fdatasyncs this much at a time (see
                                      # Store._write_temp)
FOLD_POLL = 0.05                      # the loop looks at a fold under way this often at least
GC_THRESHOLDS = (10_000, 10, 10)      # the cycle collector's after start-up; the default
                                      # (700, 10, 10) walks each job added again and again:
                                      # 1.6 us of an enqueued job's ~10 (400k jobs added),
                                      # these 0.6 us; a young collection then takes ~1-10 ms
GATHER_ACTIVE = 0.05                  # group commit: a client that sent a request this recently
GATHER_MAX = 0.002                    # may be waited for, this long at most (and never longer
                                      # than the last fsync took), so its change shares our fsync
SYNC_DELAY = 0.2                      # a journal write that no reply waits for (an attempt
                                      # started or ended) is fsynced this much later at most;
                                      # a process crash loses nothing (it is written at once),
                                      # a machine crash may lose it: that attempt then runs again
METRIC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                  10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
                                      # SPEC §7: histogram buckets from 1 ms to 1 h (s)
OUTCOMES = ("succeeded", "failed", "retried", "timed_out", "cancelled", "interrupted")
                                      # SPEC §7: how an ended attempt counts
LATEST_FAILURES = 20                  # failed attempts `top` can show; the rest is in the logs
ACTIVITY_RUNNING = 100                # running jobs an `activity` reply lists (with the total)
METRICS_HTTP_MAX_CONNECTIONS = 16     # scrapers are one or two: more at once is a flood, told 503
METRICS_HTTP_MAX_HEAD = 8192          # bytes of request head: a scrape's is a few hundred
METRICS_HTTP_TIMEOUT = 10.0           # s from connect to the response sent: then it is dropped
METRICS_HTTP_BACKLOG = 64             # connections the kernel holds until the loop accepts
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"   # SPEC §5, the format's own
RATE_WINDOW = 60                      # s: `top` shows jobs finished per second over a minute
MAX_BUG_PLACES = 100                  # internal errors reported with a traceback (once each):
                                      # past this many distinct places it is a flood, not news
START_RETRY_DELAY = 0.2               # s before the next start after one failed for a reason
                                      # of the host (no fd, no memory): soon, but no busy loop
START_WARN_INTERVAL = 60.0            # SPEC: such a failure is logged once a minute at most
STOP_SLACK = 2.0                      # s past shutdown_grace + kill_grace before a graceful stop
                                      # gives up on attempts that did not end (SPEC §3)
JSON_MAX_DEPTH = 64                   # deeper requests are refused: they must encode back out
MAX_RESULT_DEPTH = JSON_MAX_DEPTH - 2  # a result sits two levels down in a `get` reply and in
                                      # the journal's {"job": {...}} line, which must load back
TARGET_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
                       r":[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
METHOD_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")   # a leading "_" is refused by SPEC

####################################################################################################
#  Errors
####################################################################################################

ERROR_CODES = frozenset({
    "bad_request", "unknown_op", "not_allowed", "not_found", "invalid_state", "too_large",
    "queue_full", "forbidden", "busy", "shutting_down", "io_error",
})


class ProtocolError(Exception):
    """A request that cannot be served; becomes {"ok": false, "error": {code, message}}."""

    def __init__(self, code: str, message: str):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message


class ConfigError(Exception):
    """The configuration cannot be used; the daemon does not start (exit 2)."""


class StateError(Exception):
    """The state on disk is damaged or locked; the daemon does not start (exit 1)."""


####################################################################################################
#  Job states
####################################################################################################
#
#              add / retry op                 attempt starts
#   (new) ─────────────────────► PENDING ─────────────────────► RUNNING
#     │                          ▲│   ▲   attempt failed,        │  │  │
#     │ add with an    unblocked ││   └── retries left, or ──────┘  │  │ returned
#     │ unfinished               ││cancel interrupted by a stop     │  ▼
#     ▼ parent                   │▼                           ┌─────┘ SUCCEEDED
#   BLOCKED ─────────────────────┘ FAILED ◄── no retries left / not runnable
#     │  ▲ (retry op, a parent       CANCELLED ◄── cancel (blocked, pending or running), or
#     │  │  unfinished)                            a parent ended failed/cancelled (§2b)
#     │  └──────────────── FAILED, CANCELLED ──(retry op)──► PENDING
#     └─ cancel, or a parent failed ──► CANCELLED

BLOCKED, PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "blocked", "pending", "running", "succeeded", "failed", "cancelled")
STATES = (BLOCKED, PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
LIVE = frozenset({BLOCKED, PENDING, RUNNING})
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED})

# (from, to) -> the log events that may announce that move; the first is the usual one.
TRANSITIONS: dict[tuple[str | None, str], tuple[str, ...]] = {
    (None, PENDING): ("queued",),
    (None, BLOCKED): ("blocked",),
    (BLOCKED, PENDING): ("unblocked",),
    (BLOCKED, CANCELLED): ("cancelled",),
    (PENDING, RUNNING): ("started",),
    (RUNNING, SUCCEEDED): ("succeeded",),
    (RUNNING, PENDING): ("retrying", "interrupted"),
    (RUNNING, FAILED): ("failed",),
    (PENDING, CANCELLED): ("cancelled",),
    (RUNNING, CANCELLED): ("cancelled",),
    (FAILED, PENDING): ("queued",),
    (CANCELLED, PENDING): ("queued",),
    (FAILED, BLOCKED): ("blocked",),         # retried while a parent is unfinished, or put back
    (CANCELLED, BLOCKED): ("blocked",),      # as the descendant of a retried job (§2b)
}


####################################################################################################
#  Job
####################################################################################################

PUBLIC_FIELDS = (
    "id", "target", "method", "args", "kwargs", "priority", "state", "attempts", "retries",
    "retry_delay", "backoff", "timeout", "key", "queue", "after", "on_parent_failure",
    "schedule", "created_at", "run_at", "started_at", "finished_at", "pid", "exit_code", "error",
    "result",
)
# Kept on disk, never shown: the start time of `pid` (/proc/PID/stat field 22), so that after a
# crash a reused pid is never mistaken for our orphan, and who queued the job. A blocked job's
# `delay` counts from its unblocking (§2b); `cancelled_by` is the parent whose end cancelled it,
# so that a retry of that parent puts back exactly the jobs it cancelled. For a job a
# schedule's fire queued, `fire_at` is that fire's nominal time: the job's line alone proves the
# fire (StoreLoading._fired), so a crash can neither lose it nor fire that time twice.
PRIVATE_FIELDS = ("pid_start", "uid", "delay", "cancelled_by", "fire_at")


class Job:
    """One job. Plain data: only JobTable changes a job after it is created."""

    __slots__ = PUBLIC_FIELDS + PRIVATE_FIELDS + ("token",)

    def __init__(self, _record: dict | None = None, **fields):
        # Missing fields are None: one C-level merge and one C-level lookup of all 30, then
        # one unpacking into the slots, written out (a million restarts seconds faster than
        # with a get() or setattr() per field).
        (self.id, self.target, self.method, self.args, self.kwargs, self.priority, self.state,
         self.attempts, self.retries, self.retry_delay, self.backoff, self.timeout, self.key,
         self.queue, self.after, self.on_parent_failure, self.schedule, self.created_at,
         self.run_at, self.started_at, self.finished_at, self.pid, self.exit_code, self.error,
         self.result, self.pid_start, self.uid, self.delay, self.cancelled_by, self.fire_at) = \
            _stored_items(_BLANK | (fields if _record is None else _record))
        self.token = 0      # bumped whenever the job leaves a heap; stale heap entries are skipped

    def record(self) -> dict:
        """What `get` returns."""
        return dict(zip(PUBLIC_FIELDS, _public_values(self)))

    def stored(self) -> dict:
        """What the store keeps: the fields that are set (from_stored() restores the rest as
        None, [] and {}, and run_at as created_at), so a pending job's line is about half as
        long to write and read."""
        rec = {name: value for name, value in zip(_STORED_FIELDS, _stored_values(self))
               if value is not None}
        if not self.args:
            rec.pop("args", None)
        if not self.kwargs:
            rec.pop("kwargs", None)
        if not self.after:
            rec.pop("after", None)
        if self.run_at == self.created_at:
            rec.pop("run_at", None)
        for name, default in _STORED_DEFAULTS:      # what from_stored() restores
            if rec.get(name) == default:
                del rec[name]
        for name in _WHOLE_SECONDS:                 # 10 reads back faster than 10.0
            value = rec.get(name)
            if type(value) is float and value.is_integer():
                rec[name] = int(value)
        return rec

    @classmethod
    def from_stored(cls, rec: dict) -> "Job":
        """Rebuild from disk; unknown fields (a newer version's) are ignored."""
        state = _CANONICAL_STATES.get(rec.get("state"))
        if state is None or not isinstance(rec.get("id"), int):
            raise ValueError("job record without a valid id and state")
        rec["state"] = state            # one shared string per state, not one per job
        job = cls(rec)
        job.target = sys.intern(job.target)
        job.backoff = "fixed" if job.backoff == "fixed" else "exponential"
        if job.method is not None:
            job.method = sys.intern(job.method)
        job.args = job.args or NO_ARGS
        job.kwargs = job.kwargs or NO_KWARGS
        job.after = job.after or NO_AFTER
        job.on_parent_failure = "run" if job.on_parent_failure == "run" else "cancel"
        if job.run_at is None or job.run_at == job.created_at:
            job.run_at = job.created_at
        if job.attempts is None:
            job.attempts = 0
        if job.priority is None:
            job.priority = 0
        job.queue = DEFAULT_QUEUE if job.queue is None else sys.intern(job.queue)
        if job.schedule is not None:
            job.schedule = sys.intern(job.schedule)
        job.retry_delay = _shared_seconds(job.retry_delay)
        job.timeout = _shared_seconds(job.timeout)
        return job

    def attempt_label(self) -> str:
        return "%d/%d" % (self.attempts, self.retries + 1)


_STORED_FIELDS = PUBLIC_FIELDS + PRIVATE_FIELDS
# Shared by every job without args or kwargs (most of them): a million empty lists and dicts
# would cost ~120 MB. Nothing ever mutates a job's args or kwargs.
NO_ARGS: list = []
NO_KWARGS: dict = {}
NO_AFTER: list = []         # the same for `after`: never mutated either
_CANONICAL_STATES = {state: state for state in STATES}
_public_values = operator.attrgetter(*PUBLIC_FIELDS)     # one C call instead of 23 getattr()s
_stored_values = operator.attrgetter(*_STORED_FIELDS)
_stored_items = operator.itemgetter(*_STORED_FIELDS)
_all_values = operator.attrgetter(*Job.__slots__)        # what undo() puts back, in one C call
_BLANK = dict.fromkeys(_STORED_FIELDS) | {"queue": "default",  # DEFAULT_QUEUE: always a queue
                                          "after": NO_AFTER, "on_parent_failure": "cancel"}
# Left out of stored records when they have these values, which from_stored() restores: fewer
# bytes to parse for each of a million jobs at start-up.
_STORED_DEFAULTS = (("priority", 0), ("attempts", 0), ("backoff", "exponential"),
                    ("queue", "default"),        # DEFAULT_QUEUE, defined further down
                    ("on_parent_failure", "cancel"))
# Durations kept as integers on disk when they are whole (they parse faster than floats).
_WHOLE_SECONDS = ("retry_delay", "timeout")
_SECONDS: dict = {}         # one float object per distinct duration: most jobs share a few


def _shared_seconds(value):
    """A stored duration (int or float, or None) as the float jobs hold, shared when common."""
    if value is None:
        return None
    shared = _SECONDS.get(value)
    if shared is None:
        shared = float(value)
        if len(_SECONDS) < 1024:
            _SECONDS[value] = shared
    return shared


# Of a stored record, the fields that differ from one new job to the next (in _STORED_FIELDS
# order); every other field is the job's shape, which jobs added alike share.
_RECORD_SLOTS = ("id", "args", "kwargs", "key", "after", "created_at", "run_at")
_SHAPE_FIELDS = tuple(name for name in _STORED_FIELDS if name not in _RECORD_SLOTS)
_shape_values = operator.attrgetter(*_SHAPE_FIELDS)
_slot_values = operator.attrgetter(*_RECORD_SLOTS[1:])


class RecordTemplates:
    """_encode(job.stored()) of the jobs JobTable.create() makes, in ~1 µs instead of ~5: the
    C encoder pays per dict item, and a new job's record is mostly its shape (target, queue,
    retries, ...: _SHAPE_FIELDS), which an add_batch or a busy client repeats. Each shape is
    encoded once, by stored() and _encode themselves, into a %-template with a place for each
    slot (_RECORD_SLOTS); encode() fills in a job's own. Shapes are keyed by value: the
    validated fields give each number one type (priorities and retries int, durations float,
    and stored() writes whole durations as int anyway), so equal values encode alike."""

    MAX_SHAPES = 1024           # distinct shapes kept: a flood of them is not the common case

    def __init__(self):
        self.templates: dict[tuple, str] = {}
        self.created: tuple = (None, "")    # the last created_at and its encoding: a batch's
                                            # jobs share one float

    def encode(self, job: Job) -> str:
        try:
            template = self.templates.get(_shape_values(job))
        except TypeError:                   # a result that is a list or a dict: no shape
            return _encode(job.stored())
        if template is None:
            template = self._template(job)
        args, kwargs, key, after, created_at, run_at = _slot_values(job)
        if created_at is not self.created[0]:
            self.created = (created_at, "" if created_at is None else ',"created_at":' + (
                float.__repr__(created_at) if type(created_at) is float   # what the encoder
                else _encode(created_at)))                                 # writes, sooner
        # the rules of stored() for these fields: empty lists and dicts, None, and a run_at
        # equal to created_at are left out
        return template % (
            job.id,
            ',"args":' + _encode(args) if args else "",
            ',"kwargs":' + _encode(kwargs) if kwargs else "",
            "" if key is None else ',"key":' + _encode(key),
            ',"after":' + _encode(after) if after else "",
            self.created[1],
            "" if run_at is None or run_at == created_at else ',"run_at":' + _encode(run_at))

    def _template(self, job: Job) -> str:
        """The template of job's shape, from its own stored record."""
        segments = [""] * len(_RECORD_SLOTS)    # the shape's fields after each slot
        for name, value in job.stored().items():
            if name not in _RECORD_SLOTS:
                segments[_SEGMENT_OF[name]] += "," + _encode(name) + ":" + _encode(value)
        template = '{"id":%d' + "%s".join(s.replace("%", "%%") for s in segments) + "}"
        if len(self.templates) >= self.MAX_SHAPES:
            self.templates.clear()
        self.templates[_shape_values(job)] = template
        return template


# A shape field's segment: after how many slots it comes in a record.
_SEGMENT_OF = {name: sum(1 for slot in _RECORD_SLOTS[1:]
                         if _STORED_FIELDS.index(slot) < _STORED_FIELDS.index(name))
               for name in _SHAPE_FIELDS}


####################################################################################################
#  Retry policy
####################################################################################################

def next_run_at(job: Job, now: float, max_retry_delay: float) -> float | None:
    """When the next attempt of `job` may start, its attempt number `job.attempts` having just
    failed; None when no retries are left. The only place that decides about retries."""
    if job.attempts > job.retries:
        return None
    k = max(job.attempts, 1)                    # this is retry number k
    if job.backoff == "fixed":
        delay = job.retry_delay
    else:
        delay = job.retry_delay * 2.0 ** min(k - 1, 64)   # 2**64 s is already past any cap
    return now + min(delay, max_retry_delay)


# How an attempt ended, as attempt_outcome() takes it.
ENDED_OK = "ok"                         # its code returned
ENDED_ERROR = "error"                   # it failed: retried while retries are left
ENDED_PERMANENT = "permanent"           # it failed and said not to retry
ENDED_SHUTDOWN = "shutdown"             # the daemon's own stop ended it: it does not count
ENDED_INTERRUPTED = "interrupted"       # the daemon died while it ran (found at start-up)


class Ending(NamedTuple):
    how: str                            # one of the ENDED_* above
    exit_code: int | None = None
    error: str | None = None            # its one-line summary (ENDED_ERROR, ENDED_PERMANENT)
    detail: str | None = None           # for the errors log (a traceback)
    result: object = None               # its return value (ENDED_OK)


class Outcome(NamedTuple):
    """What an ended attempt makes of its job: the arguments of JobTable.transition()."""
    state: str
    event: str | None                   # None: the move's usual event
    changes: dict
    detail: str | None = None
    fields: dict = {}                   # log fields, before those of the caller
    announce: str | None = None         # an event logged before the move's own


def exit_reason(exit_code: int) -> str:
    """A process's end in words: "exited with code 3", "killed by signal SIGKILL"."""
    if exit_code < 0:
        return "killed by signal %s" % _signal_name(-exit_code)
    return "exited with code %d" % exit_code


def attempt_end_note(job: Job, ending: Ending, out: "Outcome", duration: float | None) -> str:
    """The line (and for a failure its traceback, indented, its end only) that closes an
    attempt in the job's output: how it ended, and what comes next."""
    head = "attempt %s" % job.attempt_label()
    after = "" if duration is None else " after %.2fs" % duration
    if ending.how == ENDED_OK:
        return "%s succeeded%s" % (head, after)
    if ending.how == ENDED_SHUTDOWN:
        return "%s interrupted%s by the daemon's stop (it does not count; it runs again)" \
            % (head, after)
    if ending.how == ENDED_INTERRUPTED:
        text = "%s interrupted: the daemon stopped while it ran" % head
    else:
        text = "%s failed%s: %s" % (head, after, " ".join((ending.error or "").split()))
    if out.state == PENDING:
        text += "; next attempt at %s" % log_time(out.changes["run_at"])
    elif ending.how == ENDED_PERMANENT:
        text += "; not retried"
    elif out.state == FAILED:
        text += "; no retries left"
    detail = ending.detail
    if detail and detail.strip() != (ending.error or "").strip():
        tail = detail.encode("utf-8", "replace")[-OUTPUT_TRACEBACK_BYTES:]
        lines = tail.decode("utf-8", "replace").rstrip("\n").split("\n")
        text += "".join("\n    " + line for line in lines)
    return text


def no_process(**changes) -> dict:
    """The changes of a job whose attempt's process is gone, plus `changes`."""
    return {"pid": None, "pid_start": None, **changes}


def attempt_running(number: int, pid: int, pid_start: int | None, started_at: float) -> dict:
    """The changes of a job whose attempt `number` has a process now: no outcome yet."""
    return {"attempts": number, "pid": pid, "pid_start": pid_start, "exit_code": None,
            "error": None, "result": None, "started_at": started_at}


def attempt_outcome(job: Job, ending: Ending, now: float, max_retry_delay: float) -> Outcome:
    """What the attempt of `job` (running) that ended as `ending` at `now` makes of it: the
    one place that decides between success, a retry and failure (next_run_at says when)."""
    how = ending.how
    if how == ENDED_OK:
        return Outcome(SUCCEEDED, None, no_process(result=ending.result, exit_code=0, error=None))
    if how == ENDED_SHUTDOWN:
        return Outcome(PENDING, "interrupted", no_process(
            attempts=job.attempts - 1, run_at=now, exit_code=ending.exit_code),
            fields={"attempt": job.attempt_label()})
    if how == ENDED_INTERRUPTED:
        changes = no_process(error="interrupted: the daemon stopped while the attempt ran")
        run_at = next_run_at(job, now, max_retry_delay)
        if run_at is None:
            return Outcome(FAILED, None, changes, announce="interrupted")
        changes["run_at"] = run_at
        return Outcome(PENDING, "interrupted", changes)
    error = " ".join(ending.error.split())[:MAX_ERROR_CHARS]
    changes = no_process(exit_code=ending.exit_code, error=error)
    fields = {"exit_code": ending.exit_code, "error": error}
    run_at = None if how == ENDED_PERMANENT else next_run_at(job, now, max_retry_delay)
    if run_at is None:
        return Outcome(FAILED, None, changes, ending.detail, fields)
    changes["run_at"] = fields["run_at"] = run_at
    return Outcome(PENDING, "retrying", changes, ending.detail, fields)


####################################################################################################
#  Event log
####################################################################################################

_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.:/@+,%-]+\Z")
# Everything that could end a line for some reader (str.splitlines knows \x1c-\x1e, \x85,
# \u2028, \u2029 too) or fool a terminal is written as an escape.
_CONTROLS = {c: "\\x%02x" % c for c in list(range(0x20)) + list(range(0x7f, 0xa0))
             if c != 0x09}
_CONTROLS.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
_ESCAPES = dict(_CONTROLS)      # inside a quoted value
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", ord('"'): '\\"',
                 ord("\\"): "\\\\"})


def log_value(value) -> str:
    """One value of a key=value log line: bare when that is unambiguous, else quoted."""
    if type(value) is int:
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "%.3f" % value
    if isinstance(value, int):
        return str(value)
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) > MAX_LOG_VALUE:
        text = text[:MAX_LOG_VALUE] + "...(%d more chars)" % (len(text) - MAX_LOG_VALUE)
    if text and _SAFE_VALUE.match(text):
        return text
    return '"' + text.translate(_ESCAPES) + '"'


def log_time(t: float, _cache=[None, ""]) -> str:
    """2026-11-28T16:00:00.123Z"""
    seconds, ms = divmod(round(t * 1000), 1000)
    if _cache[0] != seconds:            # strftime once a second, not once a line
        _cache[:] = [seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))]
    return _cache[1] + _MILLISECONDS[ms]


_MILLISECONDS = [".%03dZ" % ms for ms in range(1000)]  # log_time()'s ends, made once, not per line


def queue_field(job) -> dict:
    """`queue=NAME` for the log lines of a job in a queue other than `default`, and
    `schedule=NAME` for those of a job a schedule queued (SPEC §6)."""
    fields = {} if job.queue == "default" or job.queue is None else {"queue": job.queue}
    if job.schedule is not None:
        fields["schedule"] = job.schedule
    return fields


def format_event(t: float, event: str, fields: dict) -> str:
    parts = [log_time(t), "event=" + event]
    for key, value in fields.items():
        if value is not None:
            parts.append(key + "=" + log_value(value))
    return " ".join(parts) + "\n"


class WriteTrouble:
    """Whether writes to one kind of file (stderr, a log, job output) fail, so that each way is
    said once (SPEC §3): failed() is true at the first refused write, worked() gives what was
    lost once writing works again, which is only when no write has failed for QUIET seconds:
    a disk on the edge of full (small writes fit, large ones not) is not news at every write."""

    QUIET = 1.0             # seconds without a failed write before writing "works again"

    def __init__(self):
        self.since: float | None = None     # when a write last failed; None while they work
        self.lost = 0                       # what was dropped since writes began to fail

    def failed(self, lost: int) -> bool:
        first = self.since is None
        self.since = time.monotonic()
        self.lost += lost
        return first

    def worked(self) -> int | None:
        if self.since is None or time.monotonic() - self.since < self.QUIET:
            return None
        lost, self.lost, self.since = self.lost, 0, None
        return lost


class EventLog:
    """background_jobs.log (one line per event) and background_jobs_errors.log (a header line
    per failed attempt, then the traceback indented). Lines are buffered for one loop pass and
    written with one write() per file, whole or not at all; SIGHUP reopens both files
    (logrotate). A file that refuses writes (full disk) loses those lines and is said to fail
    once on stderr, and once more when it takes lines again (SPEC §3)."""

    def __init__(self, log_dir: str, clock=None):
        self.dir = log_dir
        self.clock = clock or wall_clock
        self.fds: dict[str, int] = {}
        self.buffers: dict[str, list[str]] = {"events": [], "errors": []}
        self.trouble = {kind: WriteTrouble() for kind in self.NAMES}
        self.targets: dict[str, str] = {}     # target -> as logged (most jobs share a few)
        self.reopen()

    NAMES = {"events": "background_jobs.log", "errors": "background_jobs_errors.log"}

    def reopen(self) -> None:
        """Open both files (again); raises OSError, keeping the open ones, if one cannot be."""
        fds: dict[str, int] = {}
        try:
            for kind, name in self.NAMES.items():
                fds[kind] = open_nofollow(os.path.join(self.dir, name),
                                          os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError:
            for fd in fds.values():
                os.close(fd)
            raise
        for kind, fd in fds.items():
            old = self.fds.get(kind)
            self.fds[kind] = fd
            if old is not None:
                os.close(old)

    def event(self, event: str, when: float | None = None, **fields) -> None:
        self.buffers["events"].append(format_event(when or self.clock(), event, fields))

    def queued(self, when: float, jobs: list) -> None:
        """The `queued` lines of new jobs: what event("queued", job=, target=, queue=, uid=,
        priority=, run_at=) writes, without its per-field loop (an add_batch logs thousands)."""
        head = log_time(when) + " event=queued job="
        lines, job_part, targets = self.buffers["events"], None, self.targets
        for job in jobs:
            target = targets.get(job.target)
            if target is not None and job.queue == "default" and job.schedule is None \
                    and job.uid is not None:        # the usual line, in one format
                lines.append("%s%d target=%s uid=%d priority=%d run_at=%.3f\n"
                             % (head, job.id, target, job.uid, job.priority, job.run_at))
                continue
            job_part = job_part or self._job_part()
            uid = "" if job.uid is None else " uid=%d" % job.uid
            lines.append("%s%s%s priority=%d run_at=%.3f\n"
                         % (head, job_part(job), uid, job.priority, job.run_at))

    def moved(self, when: float, event: str, jobs: list, tail: str = "") -> None:
        """What event(event, job=, target=, queue=, attempt=) and then `tail` (" error=...")
        write for each of `jobs`, without its per-field loop (a parent's end may settle
        thousands)."""
        head = log_time(when) + " event=" + event + " job="
        lines, job_part = self.buffers["events"], self._job_part()
        for job in jobs:
            lines.append("%s%s attempt=%s%s\n" % (head, job_part(job), job.attempt_label(), tail))

    def _job_part(self):
        """A function making "ID target=T" (+ " schedule=S" for a scheduled job, " queue=Q"
        outside `default`) of a job, for the bulk lines above: each target is escaped once,
        not once a line."""
        targets = self.targets
        if len(targets) >= 4096:
            targets.clear()

        def job_part(job) -> str:
            target = targets.get(job.target)
            if target is None:
                target = targets[job.target] = log_value(job.target)
            part = "%d target=%s" % (job.id, target)
            if job.schedule is not None:
                part += " schedule=" + log_value(job.schedule)
            if job.queue != "default":
                part += " queue=" + log_value(job.queue)
            return part
        return job_part

    def error(self, event: str, detail: str, when: float | None = None, **fields) -> None:
        """A header line like an event line, then `detail` on lines that start with a space."""
        lines = [format_event(when or self.clock(), event, fields)]
        for line in detail.splitlines():
            lines.append("    " + line.translate(_CONTROLS) + "\n")
        self.buffers["errors"].append("".join(lines))

    def mark(self) -> tuple[int, int]:
        return len(self.buffers["events"]), len(self.buffers["errors"])

    def rewind(self, mark: tuple[int, int]) -> None:
        """Forget lines written since `mark` (their changes were undone)."""
        del self.buffers["events"][mark[0]:]
        del self.buffers["errors"][mark[1]:]

    def flush(self) -> None:
        for kind, lines in self.buffers.items():
            if lines:
                data = "".join(lines).encode("utf-8", "replace")
                count = len(lines)
                lines.clear()
                self._write(kind, data, count)

    def _write(self, kind: str, data: bytes, count: int) -> None:
        """Append `data` (`count` whole lines) or, if the file refuses part of it, none of it:
        a short write is cut back, so a torn line never runs into the next one."""
        fd, done = self.fds[kind], 0
        try:
            while done < len(data):
                done += os.write(fd, data[done:] if done else data)
        except OSError as exc:              # a full log disk must not stop the jobs
            if done:
                try:
                    os.ftruncate(fd, os.fstat(fd).st_size - done)
                except OSError:
                    pass
            if self.trouble[kind].failed(count):
                warn("cannot write %s: %s; its lines are dropped until it works again"
                     % (self.NAMES[kind], exc))
            return
        lost = self.trouble[kind].worked()
        if lost is not None:
            warn("%s is written again; %d %s lost meanwhile"
                 % (self.NAMES[kind], lost, "line was" if lost == 1 else "lines were"))

    def close(self) -> None:
        self.flush()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class Stderr:
    """fd 2, where say() writes lines for people (systemd's journal). A failing stderr (a full
    disk, a pipe whose reader went away, or one nobody reads) never stops or blocks the daemon
    (SPEC §3): the line is dropped, and that stderr fails, and later that it works again, is
    said once each in the errors log (`log`, once the daemon has one)."""

    MAX_LINE = 4096         # PIPE_BUF: one write() of at most this much to a pipe is never torn

    def __init__(self, fd: int = 2):
        self.fd = fd
        self.log: EventLog | None = None
        self.trouble = WriteTrouble()

    def never_block(self) -> None:
        """A pipe or socket that nobody reads must not hold the loop: O_NONBLOCK on it, so that
        a full one drops the line (EAGAIN). A terminal or a file is left alone: its open file
        description is often shared with the shell that started the daemon."""
        try:
            mode = os.fstat(self.fd).st_mode
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                os.set_blocking(self.fd, False)
        except OSError:
            pass

    def write(self, line: str) -> None:
        """One line, whole, by one write(). Never raises."""
        data = (line.translate(_CONTROLS) + "\n").encode("utf-8", "replace")
        if len(data) > self.MAX_LINE:
            data = data[:self.MAX_LINE - 4].decode("utf-8", "ignore").encode() + b"...\n"
        try:
            os.write(self.fd, data)
        except OSError as exc:
            if self.trouble.failed(1) and self.log is not None:
                self.log.error("write_failed", "", file="stderr", error=str(exc))
            return
        lost = self.trouble.worked()
        if lost is not None and self.log is not None:
            self.log.error("write_resumed", "", file="stderr", lost=lost)


STDERR = Stderr()


def say(line: str) -> None:
    """One line to people on stderr (systemd's journal), written whole by one write(). Never
    raises or waits: a full disk or a closed pipe on stderr must not stop the daemon (SPEC §3)."""
    STDERR.write(line)


def warn(message: str) -> None:
    say("jobrunnerd: " + message)


def say_startup(cfg: "Config") -> None:
    """The daemon's first line once it serves (SPEC §6's `startup`, for people and journald)."""
    say("jobrunnerd: startup version=%s pid=%d socket=%s workers=%d state_dir=%s"
        % (VERSION, os.getpid(), log_value(cfg.socket), cfg.workers, log_value(cfg.state_dir)))


def say_shutdown(reason: str, uptime: float | None = None) -> None:
    """The daemon's last line: why it stops (a signal's name, or the error that stops it)."""
    say("jobrunnerd: shutdown reason=%s pid=%d%s" % (
        log_value(reason), os.getpid(), "" if uptime is None else " uptime=%.1fs" % uptime))


def send_some_of(sock: socket.socket, buf: bytearray) -> bool:
    """Send what the non-blocking socket takes of `buf` now, and drop that from `buf`;
    False when the peer is gone."""
    try:
        del buf[:sock.send(buf)]
    except BlockingIOError:
        pass
    except OSError:
        return False
    return True


def open_nofollow(path: str, flags: int, mode: int = 0o600, *, dir_fd: int | None = None) -> int:
    """os.open for a file in state_dir or log_dir: never through a symbolic link (SPEC §3a).
    A link there is an OSError(ELOOP) that says so. Also an `opener` for open()."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP or exc.errno == errno.ENOTDIR and _is_link(path, dir_fd):
            raise OSError(errno.ELOOP, "a symbolic link, not followed", path) from None
        raise


def _is_link(path: str, dir_fd: int | None) -> bool:
    """Whether `path` is a symbolic link (O_DIRECTORY | O_NOFOLLOW on a link to a directory
    fails with ENOTDIR, not ELOOP)."""
    try:
        return stat.S_ISLNK(os.lstat(path, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


####################################################################################################
#  Store: snapshot + journal
####################################################################################################

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_encoder():
    """json.dumps(obj, separators=(",", ":"), ensure_ascii=False) without the ~2 µs that
    JSONEncoder.encode() spends building a C encoder on every call: it is built once here.
    Falls back to JSONEncoder where the C accelerator is missing or behaves differently."""
    slow = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return slow

    def not_json(value):
        raise TypeError("%s is not JSON serializable" % type(value).__name__)

    try:        # no markers: our values come from JSON and cannot hold cycles
        encoder = make(None, not_json, json.encoder.encode_basestring, None, ":", ",",
                       False, False, True)
        probe = {"a": [1, 2.5, None, True, "\u00e9\n\""], "b": {}}
        if "".join(encoder(probe, 0)) != slow(probe):
            return slow
    except Exception:
        return slow
    return lambda obj: "".join(encoder(obj, 0))


_encode = _make_encoder()


def _json_line(obj) -> str:
    return _encode(obj) + "\n"


def _entry_ids(obj: dict):
    """The job ids a journal entry changes."""
    if "job" in obj:
        return (obj["job"]["id"],)
    if "jobs" in obj:
        return [rec["id"] for rec in obj["jobs"]]
    return obj.get("del", ())


# Between the records of a {"jobs":[...]} journal line: a comma and a tab. The encoder escapes
# every control character inside strings and puts no space anywhere, so this byte pair occurs
# only there, and a fold can cut the line back into records without parsing it.
RECORD_SEP = ",\t"
_RECORD_SEP = RECORD_SEP.encode()


class _NotCopyable(Exception):
    """The old snapshot cannot be copied line by line: encode every job instead."""


def _record_id(rec: bytes) -> int:
    """The id of an encoded stored record, which starts {"id":N, (stored() puts it first)."""
    try:
        if rec.startswith(b'{"id":'):
            return int(rec[6:rec.index(b",", 6)])
    except ValueError:
        pass
    raise _NotCopyable


class StoreLoading:
    """The loading half of Store (read it there): queue.json, then each journal of its
    generation or later, replayed in order, into (meta, records) at start-up; the journal is
    then opened for appending. Store's own code writes, syncs and folds."""

    def load(self, make=None) -> tuple[dict, dict]:
        """Return (meta, records by id) from snapshot + journal and open the journal for
        appending. `make` turns each stored record into what is kept (Job.from_stored), as it
        is read, so a million dicts never exist at once. Raises StateError, naming file and
        offset, on any damage but a torn tail."""
        meta = {"next_id": 1, "paused": False}     # and "queues", once a queue was paused, and
                                                   # "schedules" (Schedules.meta())
        records: dict = {}
        snap_gen = 0
        make = make or (lambda rec: rec)
        ours = False                    # one job a line: a fold may copy its lines
        if os.path.exists(self.snapshot_path):
            snap_gen, ours = self._load_snapshot(meta, records, make)
        self.snapshot_jobs = len(records)
        self.touched = {}
        self.deleted = 0
        want = snap_gen                 # the generation the next journal must have
        self.older, self.older_size, stale = [], 0, []
        for gen, path in self._older_journals():
            if gen < snap_gen:          # folded into the snapshot already
                stale.append(path)
                continue
            if gen != want:
                raise StateError("%s: journal generation %d is missing (%s is %d)"
                                 % (self.dir, want, os.path.basename(path), gen))
            good, _ = self._load_journal(meta, records, snap_gen, make, path, want)
            self.older.append(path)
            self.older_size += good
            want = gen + 1
        good, journal_gen = self._load_journal(meta, records, snap_gen, make,
                                               self.journal_path, want)
        if not ours:
            self.touched = None
        if self.lock_fd is not None:    # a daemon's own state: leftovers of folds go
            self._remove(stale + [os.path.join(self.dir, name) for name in os.listdir(self.dir)
                                  if _FOLD_TEMP.fullmatch(name)])
        if journal_gen is None or journal_gen < snap_gen:
            # No journal, or one whose changes are all in the snapshot: start a new one (after
            # the older journals, if a crash came between the two renames of a rotation).
            self.gen = want
            self._new_journal(want)
        else:
            self.gen = journal_gen
            self.fd = open_nofollow(self.journal_path, os.O_WRONLY | os.O_APPEND)
            if good < os.fstat(self.fd).st_size:
                os.ftruncate(self.fd, good)     # drop the torn tail before appending after it
                os.fsync(self.fd)
            self.size = self.synced = good
        return meta, records

    def _load_snapshot(self, meta: dict, records: dict, make) -> tuple[int, bool]:
        """Read queue.json into `records`; (its generation, whether it is one job a line)."""
        path = self.snapshot_path
        with open(path, "rb", opener=open_nofollow) as f:
            data = f.read()
        self.snapshot_size = len(data)
        if not data.strip():
            raise StateError("%s: empty snapshot (offset 0); refusing to start" % path)
        head_end = data.find(b"\n")
        tail = data.rfind(b"\n]}")
        declared = re.match(rb'\s*\{\s*"format"\s*:\s*(\d{1,9})\b', data)
        if declared:                    # before any job: a newer record may not parse here
            self._check_format(path, int(declared.group(1)))
        ours = data.startswith((b'{"format":1,', b'{"format":2,')) \
            and data[:head_end].endswith(b'"jobs":[') \
            and 0 < head_end <= tail and not data[tail + 3:].strip()
        if ours:
            # Our own layout (one job a line): parse a few MB at a time.
            doc = self._parse(data[:head_end] + b"]}", 0)
            jobs = self._jobs_in_chunks(data, head_end + 1, tail)
        else:
            doc = self._parse(data, 0)
            jobs = [(0, doc.get("jobs") if isinstance(doc, dict) else None)]
        if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
            raise StateError("%s: not a jobrunner snapshot (offset 0)" % path)
        self._check_format(path, doc.get("format", 1))
        meta["next_id"] = max(meta["next_id"], int(doc.get("next_id", 1)))
        meta["paused"] = bool(doc.get("paused", False))
        queues = doc.get("queues", {})
        if not isinstance(queues, dict) or not all(
                isinstance(kept, dict) for kept in queues.values()):
            raise StateError("%s: queues is not an object of objects (offset 0)" % path)
        if queues:
            meta["queues"] = {name: {"paused": bool(kept.get("paused", False))}
                              for name, kept in queues.items()}
        schedules = doc.get("schedules", {})
        if not isinstance(schedules, dict) or not all(
                isinstance(kept, dict) for kept in schedules.values()):
            raise StateError("%s: schedules is not an object of objects (offset 0)" % path)
        if schedules:
            meta["schedules"] = {name: dict(kept) for name, kept in schedules.items()}
        highest = 0
        for offset, chunk in jobs:
            if not isinstance(chunk, list):
                raise StateError("%s: not a jobrunner snapshot (offset %d)" % (path, offset))
            for rec in chunk:
                job_id = rec.get("id") if type(rec) is dict else None
                if type(job_id) is not int:
                    raise StateError("%s: a job without an id after offset %d" % (path, offset))
                if job_id in records:
                    raise StateError("%s: job %d appears twice (after offset %d)"
                                     % (path, job_id, offset))
                try:
                    records[job_id] = make(rec)
                except (ValueError, TypeError, AttributeError) as exc:
                    raise StateError("%s: job %d after offset %d: %s"
                                     % (path, job_id, offset, exc)) from None
                if job_id > highest:
                    highest = job_id
        meta["next_id"] = max(meta["next_id"], highest + 1)
        return int(doc.get("gen", 0)), ours

    SNAPSHOT_CHUNK = 4 * 1024 * 1024    # parse this much at once: C speed, bounded memory

    @staticmethod
    def _check_format(path: str, found) -> None:
        """A file a newer jobrunner wrote stops start-up (and is left as it is): its records
        may mean what this version cannot know."""
        if not isinstance(found, int) or isinstance(found, bool) or found < 1:
            raise StateError("%s: format %r is not a jobrunner format" % (path, found))
        if found > STORE_FORMAT:
            raise StateError("%s: written by a newer jobrunner (format %d; this one reads 1 to "
                             "%d)" % (path, found, STORE_FORMAT))

    def _jobs_in_chunks(self, data: bytes, start: int, end: int):
        """Yield (offset, list of records) for the job lines in data[start:end]."""
        while start < end:
            cut = data.find(b"\n", min(start + self.SNAPSHOT_CHUNK, end))
            cut = end if cut < 0 or cut > end else cut
            body = data[start:cut].rstrip()
            if body.endswith(b","):
                body = body[:-1]
            yield start, self._parse(b"[" + body + b"]", start - 1)
            start = cut + 1

    def _parse(self, data: bytes, base: int):
        """json.loads, with damage reported as StateError at the byte offset base + pos."""
        path = self.snapshot_path
        try:
            return json.loads(data)
        except UnicodeDecodeError as exc:
            raise StateError("%s: not UTF-8 at offset %d" % (path, base + exc.start)) from None
        except ValueError as exc:
            pos = getattr(exc, "pos", 0) or 0
            offset = base + len(data.decode("utf-8", "replace")[:pos].encode("utf-8"))
            raise StateError("%s: does not parse at offset %d: %s"
                             % (path, offset, getattr(exc, "msg", exc))) from None

    def _older_journals(self) -> list[tuple[int, str]]:
        """(generation, path) of each journal.G.jsonl, oldest first."""
        found = []
        for name in os.listdir(self.dir):
            match = _OLDER_JOURNAL.fullmatch(name)
            if match:
                found.append((int(match.group(1)), os.path.join(self.dir, name)))
        return sorted(found)

    def _load_journal(self, meta: dict, records: dict, snap_gen: int, make,
                      path: str | None = None, want: int | None = None):
        """Replay a journal (journal.jsonl by default) whose generation must be `want` (the
        snapshot's by default), or below the snapshot's (then it is ignored); return (bytes
        that are good, its generation or None)."""
        path = path or self.journal_path
        want = snap_gen if want is None else want
        try:
            with open(path, "rb", opener=open_nofollow) as f:
                data = f.read()
        except FileNotFoundError:
            return 0, None
        pieces = data.split(b"\n")
        tail = pieces.pop()             # after the last newline: empty unless the write was torn
        offset, gen = 0, None
        for i, line in enumerate(pieces):
            last = i == len(pieces) - 1 and not tail.strip(b"\0")
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or len(obj) != 1 and (
                        gen is not None or set(obj) != {"gen", "format"}):
                    raise ValueError("not a journal entry")
            except ValueError as exc:
                if last:
                    self.warnings.append("%s: dropped a torn last line at offset %d (%s)"
                                         % (path, offset, exc))
                    return offset, gen
                raise StateError("%s: bad line at offset %d: %s" % (path, offset, exc)) from None
            if gen is None:
                if "gen" not in obj:
                    raise StateError("%s: no generation header at offset 0" % path)
                self._check_format(path, obj.get("format", 1))
                gen = int(obj["gen"])
                if gen >= snap_gen and gen != want:
                    raise StateError("%s: generation %d at offset 0 is newer than %s (%d): the "
                                     "snapshot is missing or old" % (path, gen, self.SNAPSHOT,
                                                                     snap_gen)
                                     if want == snap_gen else
                                     "%s: generation %d at offset 0, not %d: a journal is "
                                     "missing" % (path, gen, want))
            elif gen >= snap_gen:       # an older generation is already in the snapshot
                try:
                    self._apply(obj, meta, records, make)
                    self._touch(_entry_ids(obj))
                    if "del" in obj:
                        self.deleted += len(obj["del"])
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    raise StateError("%s: bad entry at offset %d: %s"
                                     % (path, offset, exc)) from None
            offset += len(line) + 1
        if tail:
            self.warnings.append("%s: dropped an incomplete last line at offset %d (%d bytes)"
                                 % (path, offset, len(tail)))
        return offset, gen

    @staticmethod
    def _apply(obj: dict, meta: dict, records: dict, make) -> None:
        if "job" in obj or "jobs" in obj:
            recs = (obj["job"],) if "job" in obj else obj["jobs"]
            if not isinstance(recs, (list, tuple)):
                raise ValueError("jobs entry without a list")
            for rec in recs:
                if not isinstance(rec, dict) or not isinstance(rec.get("id"), int):
                    raise ValueError("job entry without an id")
                if "fire_at" in rec:
                    StoreLoading._fired(meta, rec)
                records[rec["id"]] = make(rec)
                meta["next_id"] = max(meta["next_id"], rec["id"] + 1)
        elif "del" in obj:
            for job_id in obj["del"]:
                records.pop(job_id, None)
        elif "paused" in obj:
            meta["paused"] = bool(obj["paused"])
        elif "queue" in obj:            # {"queue": {"name": N, "paused": P}}: one queue's pause
            name, paused = obj["queue"]["name"], obj["queue"]["paused"]
            if not isinstance(name, str):
                raise ValueError("queue entry without a name")
            meta.setdefault("queues", {})[name] = {"paused": bool(paused)}
        elif "schedule" in obj:         # {"schedule": {"name": N, ...}}: what changed of one
            changes = dict(obj["schedule"])
            name = changes.pop("name")
            if not isinstance(name, str):
                raise ValueError("schedule entry without a name")
            meta.setdefault("schedules", {}).setdefault(name, {}).update(changes)
        elif "next_id" in obj:
            meta["next_id"] = max(meta["next_id"], int(obj["next_id"]))
        else:
            raise ValueError("unknown entry %r" % next(iter(obj)))

    @staticmethod
    def _fired(meta: dict, rec: dict) -> None:
        """A job that a schedule's fire queued: that fire happened, whatever the schedule's
        own entries say (the fire and its last_run_at are one journal line). A later
        record of an older fire's job (a retry) moves nothing back."""
        fire_at, name = rec["fire_at"], rec.get("schedule")
        if not isinstance(fire_at, (int, float)) or not isinstance(name, str):
            raise ValueError("job %s: fire_at without a schedule" % rec.get("id"))
        kept = meta.setdefault("schedules", {}).setdefault(name, {})
        if fire_at >= kept.get("last_run_at", -math.inf):
            kept["last_run_at"], kept["last_job_id"] = fire_at, rec["id"]
        if fire_at > kept.get("handled", -math.inf):
            kept["handled"] = fire_at


class Store(StoreLoading):
    """The only code that reads or writes state_dir: queue.json, journal.jsonl and lock.

    Callers append() changes during a loop pass and commit() once: one write for the whole pass
    (group commit), fsynced at once when a reply waits for it, else within SYNC_DELAY. A failed
    write or fsync truncates the journal back to its last
    durable length, closes it (a failed fsync is never retried on the same descriptor as if it had
    worked) and marks the store broken; only a full snapshot() repairs it.

    Compaction is crash-safe by generations. The snapshot records the generation G of the journal
    that continues it; the journal's first line is {"gen": G}. snapshot() writes (1) a new
    queue.json with G+1 (temp file, fsync, rename, fsync of the directory), then (2) a new journal
    whose header is G+1 the same way. A crash between (1) and (2) leaves a journal of generation
    G, whose changes are all in the new snapshot: load() ignores it.

    fold() does the same without holding the loop: it renames the journal (generation G) to
    journal.G.jsonl, starts journal.jsonl with G+1, and forks a child that writes the snapshot
    G+1 (what memory held at the fork: everything up to the end of journal G) to a temp file and
    says so; the parent goes on journaling into G+1 meanwhile. Then the parent renames that file
    into place (reap_fold) and the child deletes the journals it covers (class Fold). load()
    replays the snapshot, then every journal of its generation or later in order
    (journal.S.jsonl ... journal.jsonl), and ignores older ones: every state the files pass
    through loads to the same jobs, whatever the step at which a crash stops it. A child that
    fails (disk full) leaves the old files in force: the next fold (FOLD_RETRY later) rotates
    again and covers them all."""

    SNAPSHOT, JOURNAL, LOCK = "queue.json", "journal.jsonl", "lock"

    def __init__(self, state_dir: str, fsync: bool = True):
        self.dir = state_dir
        self.do_fsync = fsync
        self.snapshot_path = os.path.join(state_dir, self.SNAPSHOT)
        self.journal_path = os.path.join(state_dir, self.JOURNAL)
        self.gen = 0
        self.fd: int | None = None        # journal, opened for append
        self.size = 0                     # journal bytes written
        self.synced = 0                   # journal bytes known durable
        self.unsynced_since: float | None = None
        self.sync_seconds = 0.0           # how long the last fsync took
        self.snapshot_size = 0
        self.lines: list[str] = []
        # id -> how many journal entries changed that job since the snapshot on disk was
        # written (None: unknown). Every other job's line in that snapshot is still right, and
        # a job changed once has its current record in the journal: a fold copies both.
        self.touched: dict[int, int] | None = None
        self.broken: OSError | None = None
        self.lock_fd: int | None = None
        self.warnings: list[str] = []
        self.older: list[str] = []        # journals before journal.jsonl that the snapshot on
        self.older_size = 0               # disk does not cover, oldest first; their bytes
        self.snapshot_jobs = 0            # jobs in the snapshot on disk
        self.deleted = 0                  # jobs deleted by the journals since that snapshot
        self.folding: Fold | None = None  # the background fold under way (at most one)
        self.fold_after = 0.0             # monotonic: no background fold before (one failed)
        self.fold_error: str | None = None    # why the last background fold failed

    # -- lifetime ----------------------------------------------------------------------------

    def lock(self) -> None:
        fd = open_nofollow(os.path.join(self.dir, self.LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError("%s is locked: another jobrunnerd is using this state_dir"
                             % os.path.join(self.dir, self.LOCK)) from None
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self.lock_fd = fd

    def close(self) -> None:
        self.end_fold()
        for fd in (self.fd, self.lock_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.lock_fd = None

    # -- writing -----------------------------------------------------------------------------

    def append(self, obj: dict) -> None:
        self.lines.append(_json_line(obj))
        if self.touched is not None:
            self._touch(_entry_ids(obj))
        if "del" in obj:
            self.deleted += len(obj["del"])

    def append_records(self, ids: list[int], encoded: list[str]) -> None:
        """New jobs, already encoded (ids in the same order): one {"jobs":[...]} entry."""
        self.lines.append('{"jobs":[' + RECORD_SEP.join(encoded) + "]}\n")
        if self.touched is not None:
            self._touch(ids)

    def _touch(self, ids) -> None:
        touched = self.touched
        for job_id in ids:
            touched[job_id] = touched.get(job_id, 0) + 1

    def discard(self) -> None:
        self.lines.clear()
        self.touched = None         # the counts no longer match the journal: fold in full

    def commit(self, sync: bool = True) -> None:
        """Write every appended change to the journal, and make the journal durable when
        `sync` or when an earlier unsynced write is SYNC_DELAY old. Raises OSError (having made
        nothing of this batch durable) when the disk refuses."""
        if self.lines:
            if self.broken is not None:
                raise self.broken
            if self.fd is None:
                raise OSError(errno.EIO, "the journal is not open")
            data = "".join(self.lines).encode("utf-8")
            self.lines.clear()
            try:
                _write_all(self.fd, data)
            except OSError as exc:
                self._break(exc)
                raise
            self.size += len(data)
            if self.unsynced_since is None:
                self.unsynced_since = time.monotonic()
        if self.unsynced_since is not None and (
                sync or time.monotonic() - self.unsynced_since >= SYNC_DELAY):
            self.sync()

    def sync(self) -> None:
        if self.do_fsync:
            started = time.monotonic()
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                self._break(exc)
                raise
            self.sync_seconds = time.monotonic() - started
        self.synced = self.size
        self.unsynced_since = None

    def settled(self) -> bool:
        """Whether every change handed to the store is durable."""
        return not self.lines and self.unsynced_since is None and self.broken is None

    def sync_due(self) -> float | None:
        """When (monotonic) written changes must be synced at the latest; None if all are."""
        return None if self.unsynced_since is None else self.unsynced_since + SYNC_DELAY

    def _break(self, exc: OSError) -> None:
        """After a failed write or fsync: cut the journal back to what is known durable."""
        self.broken = exc
        self.size = self.synced
        self.unsynced_since = None
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.ftruncate(fd, self.synced)
            except OSError:
                pass
            os.close(fd)

    def wants_compaction(self) -> bool:
        """The journals outgrew the snapshot and 1 MiB, or prunes deleted enough of its jobs
        (any, when it is small: then a fold is cheap)."""
        if self.size + self.older_size > max(JOURNAL_MIN_COMPACT, self.snapshot_size):
            return True
        return self.deleted > 0 and (self.snapshot_size <= JOURNAL_MIN_COMPACT
                                     or self.deleted * PRUNE_FOLD_SHARE >= self.snapshot_jobs)

    def snapshot(self, meta: dict, jobs) -> None:
        """Write the new snapshot and start an empty journal. `jobs` is every job: a dict by id
        (then the lines of untouched jobs are copied from the old snapshot) or an iterable.
        Repairs a broken store; raises OSError (store left as it was, or broken) when the disk
        refuses."""
        self.end_fold()             # one writer of snapshots at a time
        gen = self.gen + 1
        if not isinstance(jobs, dict):
            jobs = list(jobs)
        # The journals hold exactly the entries counted in `touched` unless a write failed
        # (broken) or some are still unwritten: then every touched job is encoded.
        tmp, size = self._write_snapshot(self.snapshot_path, gen, meta, jobs, self.touched,
                                         self.older + [self.journal_path],
                                         self.broken is None and not self.lines)
        try:
            os.replace(tmp, self.snapshot_path)
            self.snapshot_size = size
            self.gen = gen
            if self.do_fsync:
                _fsync_dir(self.dir)
            old, self.fd = self.fd, None
            if old is not None:
                os.close(old)
            self._new_journal(gen)
        except OSError as exc:
            # The new snapshot may be the one a restart sees; the old journal no longer
            # continues it. Refuse changes until a whole snapshot has been written.
            self._break(exc)
            raise
        self.lines.clear()          # everything they said is in the snapshot
        self.broken = None
        self.touched = {}
        self.deleted = 0
        self._snapshot_done(len(jobs), self.older)

    def _snapshot_done(self, jobs: int, covered: list[str], remove: bool = True) -> None:
        """A snapshot of `jobs` jobs is in place: the older journals it covers can go."""
        self.snapshot_jobs = jobs
        self.older = [path for path in self.older if path not in covered]
        self.older_size = 0
        if remove:
            self._remove(covered)

    @staticmethod
    def _remove(paths) -> None:
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass                # a leftover is ignored (and removed) by the next load

    def _write_snapshot(self, path: str, gen: int, meta: dict, jobs, touched: dict | None,
                        journals: list[str], from_journal: bool,
                        keep_temp: bool = False) -> tuple[str, int]:
        """Write the snapshot `gen` of `jobs` (a dict by id: the lines of untouched jobs are
        copied from the snapshot on disk, and of jobs `journals` change once from there; or
        a list) to PATH.tmp, fsynced; (temp path, size)."""
        fields = {"format": STORE_FORMAT, "gen": gen, "next_id": meta["next_id"],
                  "paused": meta["paused"], "queues": meta.get("queues", {})}
        if meta.get("schedules"):
            fields["schedules"] = meta["schedules"]
        head = (_json_line(fields)[:-2]
                + ',"jobs":[\n').encode()
        by_id = jobs if isinstance(jobs, dict) else None
        try:
            if by_id is None or touched is None:     # touched is kept only for ours
                raise _NotCopyable
            lines = self._copied_lines(by_id, touched, journals, from_journal)
            return self._write_temp(path, self._chunks(head, lines), keep_temp)
        except _NotCopyable:
            every = by_id.values() if by_id is not None else jobs
            lines = (_encode(job.stored()).encode("utf-8") for job in every)
            return self._write_temp(path, self._chunks(head, lines), keep_temp)

    # -- folding in the background -----------------------------------------------------------

    def can_fold(self) -> bool:
        return self.folding is None and self.broken is None and not self.lines \
            and time.monotonic() >= self.fold_after

    def fold(self, meta: dict, jobs: dict) -> None:
        """Start a background fold (see the class docstring): rotate the journal, fork the
        child that writes the snapshot. Costs the loop a few small fsyncs and the fork (page
        tables only). Raises OSError when the disk refuses the rotation (the store is broken
        if it got half way: a full snapshot repairs it)."""
        assert self.can_fold()
        if self.unsynced_since is not None:
            self.sync()             # journal G is whole on disk before G+1 can follow it
        gen = self.gen
        rotated = os.path.join(self.dir, "journal.%d.jsonl" % gen)
        os.replace(self.journal_path, rotated)
        fd, self.fd = self.fd, None
        os.close(fd)
        self.older.append(rotated)
        self.older_size += self.size
        self.gen = gen + 1
        try:
            if self.do_fsync:       # the rename is on disk before journal.jsonl is replaced
                _fsync_dir(self.dir)
            self._new_journal(gen + 1)
        except OSError as exc:
            self._break(exc)
            raise
        fold = Fold(self, gen + 1, len(jobs))
        fold.touched, self.touched = self.touched, {}
        fold.deleted, self.deleted = self.deleted, 0
        try:
            fold.start(meta, jobs)
        except OSError:
            self._fold_failed(fold)
            raise
        self.folding = fold

    def reap_fold(self) -> bool | None:
        """Once the background fold's child has written its snapshot: put it in place and let
        the child delete the journals it covers (True), or keep the old files in force (False,
        fold_error says why). None while it works, or when there is none. Cheap: a read that
        would block, or a waitpid, while the child works."""
        fold = self.folding
        if fold is None:
            return None
        if fold.placed:             # the child deletes the journals; then it is reaped
            if fold.exited():
                self.folding = None
            return None
        report = fold.report()
        if report is None:
            return None
        try:
            if not report.startswith("ok "):
                raise OSError(errno.EIO, report or "the fold's child died without a word")
            os.replace(fold.temp, self.snapshot_path)
            self.snapshot_size = int(report.split()[1])
            if self.do_fsync:       # the journals it covers go only once it is there for good
                _fsync_dir(self.dir)
        except OSError as exc:
            self.folding = None
            fold.kill()
            self._fold_failed(fold, exc)
            return False
        fold.proceed()
        self._snapshot_done(fold.jobs, fold.covers, remove=False)
        return True

    def end_fold(self) -> None:
        """Stop a background fold under way (before a snapshot in the foreground), or wait
        for the child that deletes what a fold covered."""
        fold = self.folding
        if fold is not None:
            self.folding = None
            if fold.placed:
                fold.wait()
            else:
                fold.kill()
                self._fold_failed(fold, None)

    def _fold_failed(self, fold: "Fold", exc: OSError | None = None) -> None:
        """The snapshot on disk is still the one before the fold: count from there again."""
        self._remove([fold.temp])
        if fold.touched is None or self.touched is None:
            self.touched = None
        else:                       # (in place: proportional to the changes since the fork)
            merged = fold.touched
            for job_id, n in self.touched.items():
                merged[job_id] = merged.get(job_id, 0) + n
            self.touched = merged
        self.deleted += fold.deleted
        if exc is not None:
            self.fold_error = exc.strerror or str(exc)
            self.fold_after = time.monotonic() + FOLD_RETRY

    @staticmethod
    def _chunks(head: bytes, lines):
        """The snapshot's bytes: `head`, the job lines (comma and newline between them) a few
        thousand at a time (bounded memory), the closing line."""
        yield head
        batch, sep = [], b""
        for line in lines:
            batch.append(line)
            if len(batch) == 4096:
                yield sep + b",\n".join(batch)
                batch, sep = [], b",\n"
        if batch:
            yield sep + b",\n".join(batch)
        yield b"\n]}\n"

    def _copied_lines(self, by_id: dict, touched: dict, journals: list[str], from_journal: bool):
        """Each untouched job's line, copied from the old snapshot; the record of each job
        journaled once, copied from `journals` (when `from_journal`: they hold exactly the
        entries counted in `touched`); the other touched jobs that still exist, encoded.
        Raises _NotCopyable if a file is not laid out as we write it."""
        with open(self.snapshot_path, "rb", opener=open_nofollow) as old:
            old.readline()                          # the old header
            for line in old:
                if line.startswith(b"]}"):
                    break
                job_id = _record_id(line)
                if job_id not in touched and job_id in by_id:
                    yield line.rstrip(b",\n")
            else:
                raise _NotCopyable                  # no closing line: not our layout
        if from_journal:
            yield from self._journaled_once(by_id, touched, journals)
        for job_id, entries in touched.items():
            if entries > 1 or not from_journal:
                job = by_id.get(job_id)
                if job is not None:
                    yield _encode(job.stored()).encode("utf-8")

    @staticmethod
    def _journaled_once(by_id: dict, touched: dict, journals: list[str]):
        """The record of each existing job that the journals change exactly once: that record
        is the job as it is now (every change to a job is journaled). Raises _NotCopyable if
        they do not hold exactly one record for each of them."""
        copied: set[int] = set()
        for path in journals:
            with open(path, "rb", opener=open_nofollow) as journal:
                journal.readline()                  # the generation header
                for line in journal:
                    if line.startswith(b'{"jobs":[') and line.endswith(b"]}\n"):
                        records = line[9:-3].split(_RECORD_SEP)
                    elif line.startswith(b'{"job":{') and line.endswith(b"}}\n"):
                        records = (line[7:-2],)
                    elif line.startswith(b'{"job'):
                        raise _NotCopyable          # not laid out as we write it
                    else:
                        continue                    # del, paused, next_id
                    for rec in records:
                        job_id = _record_id(rec)
                        if touched.get(job_id) == 1 and job_id in by_id:
                            if job_id in copied:
                                raise _NotCopyable  # never a job twice in the snapshot
                            copied.add(job_id)
                            yield rec
        if len(copied) != sum(1 for job_id, n in touched.items() if n == 1 and job_id in by_id):
            raise _NotCopyable                      # never a job left out of the snapshot

    def _new_journal(self, gen: int) -> None:
        header = _json_line({"gen": gen, "format": STORE_FORMAT}).encode()
        self._replace(self.journal_path, header)
        self.fd = open_nofollow(self.journal_path, os.O_WRONLY | os.O_APPEND)
        self.size = self.synced = len(header)
        self.unsynced_since = None

    def _replace(self, path: str, data: bytes) -> None:
        """Atomically: temp file in the same directory, fsync, rename, fsync the directory."""
        os.replace(self._write_temp(path, [data])[0], path)
        if self.do_fsync:
            _fsync_dir(self.dir)

    def _write_temp(self, path: str, chunks, keep: bool = False) -> tuple[str, int]:
        """Write the byte strings of `chunks` to PATH.tmp and fsync it; (temp path, size).
        A fold's child (`keep`) leaves the temp file to its parent when it fails, and syncs
        every FOLD_SYNC_EVERY bytes: the journal's fdatasync then never queues behind a
        hundred megabytes of snapshot written back at once."""
        tmp = path + ".tmp"
        try:                    # a leftover (or a planted link) goes; O_EXCL: nothing in its place
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        size = synced = 0
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
                size += len(chunk)
                if keep and self.do_fsync and size - synced >= FOLD_SYNC_EVERY:
                    os.fdatasync(fd)
                    synced = size
            if self.do_fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            if not keep:
                os.unlink(tmp)
            raise
        os.close(fd)
        return tmp, size


_OLDER_JOURNAL = re.compile(r"journal\.(\d+)\.jsonl")      # a journal a fold has not covered yet
_FOLD_TEMP = re.compile(r"queue\.json\.\d+\.tmp")            # a fold's snapshot being written


class Fold:
    """The child process of a background fold. It writes the snapshot `gen` from its copy of
    memory to queue.json.GEN.tmp (a name no other fold uses: an orphan left by a daemon that
    was killed cannot collide with a later one), says "ok SIZE" on a pipe and waits. The parent
    renames the file into place (the child never renames anything: only the daemon holding the
    lock does), then says go; the child deletes the journals the snapshot covers (~30 ms each
    for a large file on this kind of disk: not in the loop) and exits. It dies with the
    parent, holds none of its files and never runs the cycle collector."""

    def __init__(self, store: Store, gen: int, jobs: int):
        self.store = store
        self.gen = gen
        self.jobs = jobs                        # how many the snapshot holds
        self.covers = list(store.older)         # the journals it folds
        self.temp = "%s.%d.tmp" % (store.snapshot_path, gen)
        self.touched: dict | None = None        # the store's counts for those journals
        self.deleted = 0
        self.pid: int | None = None
        self.pipe: int | None = None            # child -> parent: its one line
        self.go: int | None = None              # parent -> child: the snapshot is in place
        self.said = b""
        self.placed = False                     # renamed into place; the child deletes

    def start(self, meta: dict, jobs: dict) -> None:
        r, w = os.pipe()
        go_r, go_w = os.pipe()
        # What exists now is frozen out of the cycle collector (jobs never form cycles): a
        # full collection would write to every object's header, copying each page the child
        # shares (and take ~100 ms at 1M jobs); later ones see only what is created after.
        gc.freeze()
        try:
            pid = os.fork()
        except OSError:
            for fd in (r, w, go_r, go_w):
                os.close(fd)
            raise
        if pid == 0:                            # the child: never returns
            status = 1
            try:
                self._detach((w, go_r))
                path = self.temp[:-len(".tmp")]
                _, size = self.store._write_snapshot(path, self.gen, meta, jobs, self.touched,
                                                     self.covers, True, keep_temp=True)
                _write_all(w, b"ok %d\n" % size)
                if os.read(go_r, 1) == b"x":
                    Store._remove(self.covers)
                status = 0
            except BaseException as exc:
                try:
                    _write_all(w, ("%s: %s\n" % (type(exc).__name__, exc)).encode()[-1000:])
                except BaseException:
                    pass
            finally:
                os._exit(status)
        os.close(w)
        os.close(go_r)
        os.set_blocking(r, False)
        self.pid, self.pipe, self.go = pid, r, go_w

    @staticmethod
    def _detach(keep: tuple) -> None:
        """In the child: die with the parent, hold none of its files (sockets, journal, lock,
        logs) and none of its signal handling, never run the cycle collector."""
        gc.disable()
        parent = os.getppid()
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
        except Exception:
            pass
        if os.getppid() != parent:
            os._exit(1)                         # the parent died before prctl took effect
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
        except (ValueError, OSError):
            pass
        low = 3
        for fd in sorted(keep):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 20)

    def report(self) -> str | None:
        """The child's line ("ok SIZE", or why it failed) once it has said it or died without
        a word (then ""); None while it works."""
        while True:
            try:
                data = os.read(self.pipe, 4096)
            except BlockingIOError:
                return None
            self.said += data
            if not data or self.said.endswith(b"\n"):
                return self.said.decode("utf-8", "replace").strip()

    def proceed(self) -> None:
        """The snapshot is in place: the child may delete the journals it covers, and exit."""
        self.placed = True
        try:
            os.write(self.go, b"x")
        except OSError:
            pass                # it died: the next load removes what it left
        self._close()

    def exited(self) -> bool:
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return True
        return bool(done)

    def wait(self) -> None:
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait()
        self._close()

    def _close(self) -> None:
        for name in ("pipe", "go"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


####################################################################################################
#  Queue: Queue and Scheduler, JobTable (the one writer of job state)
####################################################################################################

DEFAULT_QUEUE = "default"       # every job's queue unless its `add` names another (SPEC §2a)
QUEUE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")     # SPEC §2a: 1-64 of A-Z a-z 0-9 _ . -


class Queue:
    """One queue: its name, its worker slots, whether it is paused, and its pending jobs:

        ready     heap of (-priority, id, token): due pending jobs, best first; equal
                  priorities in enqueue order (FIFO: ids grow with every add)
        delayed   heap of (run_at, id, token): pending jobs not yet due

    Heap entries are never removed in place: a job that leaves a heap bumps its `token` (the
    JobTable does), and entries with an old token are skipped when they surface. `jobs` is the
    table's id -> Job dict, to tell live entries from stale ones.

    `running` counts the attempts that hold one of its slots: from the dispatcher's start
    until the runner says the process has exited (a cancelled attempt being killed still holds
    its slot). `counts` is its jobs per state, kept by JobTable._index()/_unindex(). A queue
    the config no longer declares (after SIGHUP) keeps its jobs but starts none."""

    def __init__(self, name: str, workers: int, declared: bool = True,
                 isolation: str = "fresh"):
        self.name = name
        self.workers = workers
        self.paused = False
        self.declared = declared
        self.isolation = isolation
        self.running = 0
        self.counts = dict.fromkeys(STATES, 0)
        self.ready: list[tuple] = []
        self.delayed: list[tuple] = []

    def may_start(self, running: int | None = None) -> bool:
        """Is one of its slots free, and may it start attempts at all?"""
        used = self.running if running is None else running
        return self.declared and not self.paused and used < self.workers

    def describe(self) -> dict:
        """What the `queues` op says of it."""
        return {"name": self.name, "workers": self.workers, "running": self.running,
                "paused": self.paused, "declared": self.declared, "isolation": self.isolation,
                "counts": dict(self.counts)}

    def add(self, job: Job, now: float, push=heapq.heappush) -> None:
        """A pending job onto the heap it belongs on at `now`."""
        if job.run_at <= now:
            push(self.ready, (-job.priority, job.id, job.token))
        else:
            push(self.delayed, (job.run_at, job.id, job.token))

    def heapify(self) -> None:
        for heap in (self.ready, self.delayed):
            heapq.heapify(heap)         # O(n) once, not a push per job

    def pop_due(self, now: float, jobs: dict) -> Job | None:
        """The pending job that should start next, taken off the heap; None if none is due."""
        delayed, ready = self.delayed, self.ready
        while delayed and delayed[0][0] <= now:
            run_at, job_id, token = heapq.heappop(delayed)
            job = jobs.get(job_id)
            if job is not None and job.token == token:
                heapq.heappush(ready, (-job.priority, job_id, token))
        while ready:
            _, job_id, token = heapq.heappop(ready)
            job = jobs.get(job_id)
            if job is not None and job.token == token:
                job.token += 1          # it is off the heap now
                return job
        return None

    def has_due(self, now: float, jobs: dict) -> bool:
        self._drop_stale(jobs)
        return bool(self.ready) or bool(self.delayed and self.delayed[0][0] <= now)

    def next_run_at(self, jobs: dict) -> float | None:
        self._drop_stale(jobs)
        return self.delayed[0][0] if self.delayed else None

    def _drop_stale(self, jobs: dict) -> None:
        for heap in (self.ready, self.delayed):
            while heap:
                job = jobs.get(heap[0][-2])
                if job is not None and job.token == heap[0][-1]:
                    break
                heapq.heappop(heap)


class Scheduler:
    """Which pending job starts next, and when the next one is due: the queues, each with its
    slots, its running attempts and its paused flag, plus the whole-daemon pause (`paused`).
    A free slot in queue Q starts Q's best due job whatever the other queues hold; a loop over
    the queues (a handful) per start, a heap pop within one. It holds no sockets and no
    processes: tests step it with `now`. The JobTable tells it of every job that becomes
    pending (add) and keeps `jobs` pointing at its id -> Job dict."""

    def __init__(self, workers: int = 1):
        self.jobs: dict[int, Job] = {}
        self.paused = False             # the whole daemon's pause: no queue starts anything
        self.default = Queue(DEFAULT_QUEUE, workers)
        self.queues = {DEFAULT_QUEUE: self.default}

    def queue(self, name: str | None) -> Queue:
        """The queue of that name; one the config does not declare (jobs of a queue removed
        from it, a pause kept on disk) is made undeclared, with no slots."""
        queue = self.queues.get(DEFAULT_QUEUE if name is None else name)
        if queue is None:
            queue = self.queues[name] = Queue(name, 0, declared=False)
        return queue

    def configure(self, cfg: "Config") -> None:
        """Apply the config's queues (at start-up and on SIGHUP): slots and isolation of each
        declared queue as configured (undoing set_workers), the others undeclared. Pauses and
        running counts stay: they are not the config's."""
        self.default.workers, self.default.isolation = cfg.workers, cfg.isolation
        for name, queue in self.queues.items():
            if name != DEFAULT_QUEUE and name not in cfg.queues:
                queue.declared = False
        for name, table in cfg.queues.items():
            queue = self.queue(name)
            queue.declared = True
            queue.workers, queue.isolation = table["workers"], table["isolation"]

    def add(self, job: Job, now: float, push=heapq.heappush) -> None:
        (self.queues.get(job.queue) or self.queue(job.queue)).add(job, now, push)

    def heapify(self) -> None:
        for queue in self.queues.values():
            queue.heapify()

    def may_start(self, running: int | None = None) -> bool:
        """May an attempt start now in some queue (a slot free, not paused)? `running`, if
        given, counts the default queue's attempts instead of its own count."""
        if self.paused:
            return False
        return any(queue.may_start(running if queue is self.default else None)
                   for queue in self.queues.values())

    def next_job(self, now: float, running: int | None = None) -> Job | None:
        """The job to start now (off its heap), or None: nothing due where a slot is free, or
        paused. `running` as for may_start()."""
        if self.paused:
            return None
        jobs = self.jobs
        for queue in self.queues.values():
            if queue.may_start(running if queue is self.default else None):
                job = queue.pop_due(now, jobs)
                if job is not None:
                    return job
        return None

    def pop_due(self, now: float) -> Job | None:
        """A due job that should start next, whatever the slots and the pauses say (the
        default queue's first)."""
        for queue in self.queues.values():
            job = queue.pop_due(now, self.jobs)
            if job is not None:
                return job
        return None

    def has_due(self, now: float) -> bool:
        return any(queue.has_due(now, self.jobs) for queue in self.queues.values())

    def next_run_at(self) -> float | None:
        """When the earliest job that is not due yet becomes due (None: there is none)."""
        times = [t for t in (q.next_run_at(self.jobs) for q in self.queues.values())
                 if t is not None]
        return min(times) if times else None

    def due_in(self, now: float) -> float | None:
        """Seconds until a job is due in a queue that may start it: 0.0 if one is, None if
        none is pending there (a paused or full queue's due jobs do not wake the loop)."""
        if self.paused:
            return None
        soonest = None
        for queue in self.queues.values():
            if not queue.may_start():
                continue
            if queue.has_due(now, self.jobs):
                return 0.0
            run_at = queue.next_run_at(self.jobs)
            if run_at is not None and (soonest is None or run_at < soonest):
                soonest = run_at
        return None if soonest is None else max(soonest - now, 0.0)


class JobTable:
    """Every job in memory, with the indexes that keep each question cheap:

        scheduler the pending jobs, in their queue's heaps (Scheduler, Queue)
        finished  heap of (finished_at, id): for pruning old finished jobs
        counts    jobs per state;  keys  unique key -> id of the live job holding it
        ids       every id, ascending (for `list ... after_id`)
        by_state  state -> ids in it (so `list --state failed` never scans a million pending)
        by_queue  queue name -> its ids, ascending (so `list --queue emails` reads that queue's
                  jobs, not every job); per queue counts per state are Queue.counts
        by_schedule schedule name -> ids of the jobs it queued, ascending (`list --schedule`)
        live_by_schedule  schedule name -> ids of its live jobs (overlap, `trigger`)
        by_target target -> its ids, ascending (so `list --target 'reports.*'` reads the jobs
                  of the targets that match, not every job); built at its first use, a slice
                  per loop pass (index_targets()), kept up to date from its start
        children  parent id -> {child id: None} of the jobs that list it in `after` (§2b): a
                  parent's end settles its blocked children in O(children), never a scan
        unfinished child id -> how many of its parents are live (absent: none); a blocked job
                  whose count falls to 0 is settled
        live_children parent id -> how many live jobs list it (absent: none): prune keeps it
        kept      finished parents prune found listed, off the `finished` heap until their
                  last live child is gone (then pushed back), so no prune looks at them again

    Heap entries are never removed in place: a job that leaves a heap bumps its `token`, and
    entries with an old token are skipped when they surface. _index() and _unindex() are
    the only code that changes these indexes; every change to a job goes through them.

    transition() is the only code that assigns job.state: it checks TRANSITIONS, stamps the
    times, writes the log line and journals the job. update() journals other changes. While
    tracking (a client request is being served), the first change to a job saves its previous
    values so that undo() can restore them when the journal write fails."""

    IN_PLACE_RUNS = 16     # more runs of removed ids than this: one copying pass is cheaper

    def __init__(self, store: Store, log: EventLog, clock=None, scheduler: Scheduler | None = None):
        self.store = store
        self.log = log
        self.clock = clock or wall_clock
        self.jobs: dict[int, Job] = {}
        self.scheduler = scheduler or Scheduler()
        self.scheduler.jobs = self.jobs
        self.ids: list[int] = []
        self.finished: list[tuple] = []
        self.counts = dict.fromkeys(STATES, 0)
        self.by_state: dict[str, set[int]] = {state: set() for state in STATES}
        self.by_queue: dict[str, list[int]] = {}
        self.by_schedule: dict[str, list[int]] = {}
        self.live_by_schedule: dict[str, set[int]] = {}
        self.schedules = None           # Schedules, whose changes track()/undo() cover too
        self.by_target: dict[str, list[int]] | None = None
        self._targets_done = 0                  # by_target holds every id up to this one
        self._targets_upto = 0                  # and create() adds those above this one
        self.keys: dict[str, int] = {}
        self.children: dict[int, dict[int, None]] = {}
        self.unfinished: dict[int, int] = {}
        self.live_children: dict[int, int] = {}
        self.kept: set[int] = set()
        self._ended: collections.deque[Job] = collections.deque()  # finished parents to settle
        self._ended_saved: list[Job] = []          # _ended at track(), for undo()
        self._settling = False
        self.settle_budget: int | None = None      # children settled per call at most (the
                                                   # daemon's: SETTLE_SLICE); None: all at once
        self.next_id = 1
        self.changed: list[Job] = []        # jobs that finished during this pass (for waiters)
        self.enqueued: list[Job] = []       # jobs added or put back this pass (add, add_batch,
                                            # fires, retry): counted once the pass is written
        self.records = RecordTemplates()    # create()'s journal lines
        self._undo: dict[int, tuple] | None = None
        self._undo_paused: bool | None = None
        self._undo_queues: dict[str, bool] = {}     # queue -> its pause before this pass

    # -- loading -----------------------------------------------------------------------------

    def load(self, meta: dict, records: dict[int, dict]) -> None:
        self.next_id = meta["next_id"]
        self.scheduler.paused = meta["paused"]
        for name, kept in meta.get("queues", {}).items():
            self.scheduler.queue(name).paused = kept.get("paused", False)
        now = self.clock()
        for job_id, job in records.items():
            if not isinstance(job, Job):
                try:
                    records[job_id] = Job.from_stored(job)
                except (ValueError, TypeError, AttributeError) as exc:
                    raise StateError("job %d in %s: %s" % (job_id, self.store.dir, exc)) from None
        self.jobs = records             # taken over, not copied: a million entries
        self.scheduler.jobs = records
        self.ids = sorted(records)
        link = self._link
        for job in records.values():        # every edge first: _index() counts along them
            if job.after:
                link(job)
        index = self._index
        by_queue: dict[str, list[int]] = {}
        by_schedule: dict[str, list[int]] = {}
        for job in records.values():
            index(job, now, list.append)
            ids = by_queue.get(job.queue)
            if ids is None:
                ids = by_queue[job.queue] = []
            ids.append(job.id)
            if job.schedule is not None:
                by_schedule.setdefault(job.schedule, []).append(job.id)
        for ids in (*by_queue.values(), *by_schedule.values()):
            ids.sort()                  # in id order already, but for jobs the journal re-adds
        self.by_queue, self.by_schedule = by_queue, by_schedule
        self.scheduler.heapify()
        heapq.heapify(self.finished)    # O(n) once, not a push per job

    @property
    def paused(self) -> bool:
        """The whole daemon's pause (stats, the journal's `paused` entry)."""
        return self.scheduler.paused

    def queue_meta(self) -> dict:
        """What the snapshot keeps of the queues: the pause of each paused one."""
        return {name: {"paused": True} for name, queue in self.scheduler.queues.items()
                if queue.paused}

    # -- indexes -----------------------------------------------------------------------------

    def _index(self, job: Job, now: float | None = None, push=heapq.heappush) -> None:
        self.counts[job.state] += 1
        self.by_state[job.state].add(job.id)
        queue = self.scheduler.queues.get(job.queue) or self.scheduler.queue(job.queue)
        queue.counts[job.state] += 1
        if job.state == PENDING:
            queue.add(job, self.clock() if now is None else now, push)
        elif job.state in FINISHED:
            push(self.finished, (job.finished_at or 0.0, job.id))
        if job.state in LIVE:
            if job.key is not None:
                self.keys[job.key] = job.id
            if self.children:
                self._count_live(job, 1)
        if job.schedule is not None and job.state in LIVE:
            self.live_by_schedule.setdefault(job.schedule, set()).add(job.id)

    def _unindex(self, job: Job) -> None:
        self.counts[job.state] -= 1
        self.scheduler.queue(job.queue).counts[job.state] -= 1
        self.by_state[job.state].discard(job.id)
        job.token += 1
        if job.key is not None and self.keys.get(job.key) == job.id:
            del self.keys[job.key]
        if job.state in LIVE and self.children:
            self._count_live(job, -1)
        elif job.state in FINISHED and self.kept:
            self.kept.discard(job.id)       # it leaves the finished jobs (retry, prune)

        if job.schedule is not None:
            live = self.live_by_schedule.get(job.schedule)
            if live is not None:
                live.discard(job.id)
                if not live:
                    del self.live_by_schedule[job.schedule]

    def _count_live(self, job: Job, step: int) -> None:
        """A live job counts once for each of its children (unfinished) and for each of its
        parents (live_children); a delta each way, so that undo() stays exact in any order."""
        children = self.children.get(job.id)
        if children:
            unfinished = self.unfinished
            for child_id in children:
                left = unfinished.get(child_id, 0) + step
                if left:
                    unfinished[child_id] = left
                else:
                    del unfinished[child_id]
        if job.after:
            live, jobs = self.live_children, self.jobs
            for parent_id in job.after:
                left = live.get(parent_id, 0) + step
                if left:
                    live[parent_id] = left
                    continue
                del live[parent_id]
                if parent_id in self.kept:          # its last live child is gone: prunable
                    self.kept.discard(parent_id)
                    parent = jobs.get(parent_id)
                    if parent is not None and parent.state in FINISHED:
                        heapq.heappush(self.finished, (parent.finished_at or 0.0, parent_id))

    def _link(self, job: Job) -> None:
        """Add the edges of `job` (its `after`) to the children index."""
        children = self.children
        for parent_id in job.after:
            kids = children.get(parent_id)
            if kids is None:
                kids = children[parent_id] = {}
            kids[job.id] = None

    def _unlink(self, job: Job) -> None:
        children = self.children
        for parent_id in job.after:
            kids = children.get(parent_id)
            if kids is not None:
                kids.pop(job.id, None)
                if not kids:
                    del children[parent_id]

    # -- the writer --------------------------------------------------------------------------

    def create(self, now: float, batch: list[dict]) -> list[Job]:
        """New jobs from validated fields (an `add`, or a whole `add_batch`): the move from
        nothing to pending, made for all of them at once, with a `queued` line each and one
        journal entry for the lot (thousands of transition() calls would cost 3x more).
        `after` holds existing ids (a batch's negative entries resolved by the caller to the
        ids this call gives: next_id onwards). A job with a live parent is `blocked` instead;
        one whose parent has already ended failed or cancelled is blocked and settled at once
        (cancelled, or pending with "run"), in the same journal write."""
        assert TRANSITIONS[(None, PENDING)] == ("queued",)
        assert TRANSITIONS[(None, BLOCKED)] == ("blocked",)
        jobs: list[Job] = []
        if not batch:
            return jobs
        blocked, settle, all_jobs = [], [], self.jobs
        # per job, the loop below is most of an `add`: the attributes it reads are locals
        ids, lines, encode = [], [], self.records.encode
        undo, table_ids, by_queue, by_target = self._undo, self.ids, self.by_queue, self.by_target
        index, intern = self._index, sys.intern
        for fields in batch:
            job = Job(fields)
            job.id = job_id = self.next_id
            self.next_id += 1
            job.state, job.attempts, job.created_at = PENDING, 0, now
            job.target = intern(job.target)
            job.on_parent_failure = job.on_parent_failure or "cancel"
            if job.after:
                self._link(job)
                live = failed = 0
                for parent_id in job.after:
                    state = all_jobs[parent_id].state
                    if state in LIVE:
                        live += 1
                    elif state != SUCCEEDED:
                        failed += 1
                if live:
                    self.unfinished[job_id] = live
                if live or (failed and job.on_parent_failure == "cancel"):
                    job.state = BLOCKED
                    blocked.append(job)
                    if not live or failed:      # (a failed parent cancels it at once)
                        settle.append(job)
                else:
                    job.delay = None        # every parent has ended: its delay runs from now
            else:
                job.after = NO_AFTER
            if job.state == PENDING:
                job.delay = None            # counted in run_at already
            if undo is not None:
                undo[job_id] = (job, None)
            all_jobs[job_id] = job
            table_ids.append(job_id)
            in_queue = by_queue.get(job.queue)
            if in_queue is None:
                in_queue = by_queue[job.queue] = []
            in_queue.append(job_id)
            if job.schedule is not None:
                self.by_schedule.setdefault(job.schedule, []).append(job_id)
            if by_target is not None:
                by_target.setdefault(job.target, []).append(job_id)
            index(job, now)
            jobs.append(job)
            ids.append(job_id)
            lines.append(encode(job))
        if blocked:
            self.log.queued(now, [job for job in jobs if job.state == PENDING])
            for job in blocked:
                self.log.event("blocked", when=now, job=job.id, target=job.target,
                               **queue_field(job), uid=job.uid,
                               after=",".join(map(str, job.after)))
        else:
            self.log.queued(now, jobs)
        self.store.append_records(ids, lines)
        self.enqueued += jobs
        for job in settle:
            self.settle_blocked(job)
        return jobs

    def transition(self, job: Job, state: str, event: str | None = None, detail: str | None = None,
                   changes: dict | None = None, **log_fields) -> None:
        """Move `job` to `state`, applying `changes`; log `event` and journal the job."""
        old = job.state
        events = TRANSITIONS.get((old, state))
        assert events, "illegal transition %s -> %s (job %d)" % (old, state, job.id)
        event = event or events[0]
        assert event in events, "%s cannot be announced as %s" % ((old, state), event)
        self._save(job)
        if old is not None:
            self._unindex(job)
        now = self.clock()
        job.state = state
        if state == RUNNING:
            job.started_at = now
            job.finished_at = None
        elif state in FINISHED:
            job.finished_at = now
            self.changed.append(job)
        for name, value in (changes or {}).items():
            setattr(job, name, value)
        self._index(job)
        fields = {"job": job.id, "target": job.target, **queue_field(job)}
        if state != PENDING or event != "queued":
            fields["attempt"] = job.attempt_label()
        fields.update(log_fields)
        if detail is not None:
            self.log.error(event, detail, when=now, **fields)
        self.log.event(event, when=now, **fields)
        self.store.append({"job": job.stored()})
        if state in FINISHED and job.id in self.children:
            self._ended.append(job)
            if not self._settling:          # a cascade is a loop here, never a recursion
                self._settle_children()

    # -- dependencies (§2b) ------------------------------------------------------------------

    def _settle_children(self) -> None:
        """Settle the blocked children of the parents that ended, and theirs in turn: at most
        settle_budget of them per call; the rest in later calls (settle_more(), a pass at a
        time), so a parent with 10,000 children never holds the loop. A crash in between
        loses nothing: start-up settles every job left blocked on ended parents."""
        self._settling = True
        try:
            ended, jobs, unfinished = self._ended, self.jobs, self.unfinished
            room = math.inf if self.settle_budget is None else self.settle_budget
            while ended and room > 0:
                parent = ended.popleft()
                if parent.state not in FINISHED or jobs.get(parent.id) is not parent:
                    continue                    # its end was undone (a refused write)
                failed = parent.state != SUCCEEDED
                unblock, cancel, late = [], [], []
                for child_id in self.children.get(parent.id, ()):
                    child = jobs.get(child_id)
                    if child is None or child.state != BLOCKED:
                        continue
                    if failed and child.on_parent_failure == "cancel":
                        cancel.append(child)
                    elif child_id not in unfinished:
                        other = self._failed_parent(child)
                        if other is None:
                            unblock.append(child)
                        else:
                            late.append((child, other))
                if len(unblock) + len(cancel) + len(late) > room:
                    ended.appendleft(parent)    # the rest of its children: next call
                    unblock = unblock[:int(room)]
                    cancel = cancel[:int(room) - len(unblock)]
                    late = late[:int(room) - len(unblock) - len(cancel)]
                room -= len(unblock) + len(cancel) + len(late)
                if unblock:
                    self._settle_many(unblock, PENDING)
                if cancel:
                    self._settle_many(cancel, CANCELLED, parent)
                for child, other in late:
                    if child.state == BLOCKED:
                        self._cancel_by(child, other)
        finally:
            self._settling = False

    def settle_more(self) -> None:
        """Go on settling the children of ended parents (what a budget left for later)."""
        if self._ended and not self._settling:
            self._settle_children()

    @property
    def settling_left(self) -> bool:
        return bool(self._ended)

    def _settle_many(self, moved: list[Job], state: str, parent: Job | None = None) -> None:
        """What _unblock() (state PENDING) or _cancel_by(job, parent) (CANCELLED) does to each
        of `moved` (blocked), done for all at once with one journal entry: a parent with
        10,000 children settles them in one pass, a transition() each would take 3x longer."""
        event = TRANSITIONS[(BLOCKED, state)][0]
        now = self.clock()
        save, unindex, index, changed = self._save, self._unindex, self._index, self.changed
        error = None if parent is None else "parent %d %s" % (parent.id, parent.state)
        for job in moved:
            assert job.state == BLOCKED, "illegal transition %s -> %s (job %d)" % (
                job.state, state, job.id)
            save(job)
            unindex(job)
            job.state = state
            if state == PENDING:
                job.run_at = max(job.run_at, now + (job.delay or 0.0))
                job.delay = None
            else:
                job.finished_at = now
                job.error, job.cancelled_by = error, parent.id
                changed.append(job)
            index(job, now)
        self.log.moved(now, event, moved, "" if error is None else " error=" + log_value(error))
        self.store.append_records([job.id for job in moved], [_encode(job.stored()) for job in moved])
        if state in FINISHED:
            children = self.children
            self._ended.extend(job for job in moved if job.id in children)

    def _failed_parent(self, job: Job) -> Job | None:
        """A parent of `job` (on_parent_failure "cancel") that ended failed or cancelled: only
        possible for a job that `retry` put back while another of its parents had failed, so
        the cost (its parents) is paid only by jobs with several."""
        if job.on_parent_failure != "cancel" or len(job.after) < 2:
            return None
        jobs = self.jobs
        for parent_id in job.after:
            parent = jobs.get(parent_id)
            if parent is not None and parent.state in (FAILED, CANCELLED):
                return parent
        return None

    def settle_blocked(self, job: Job) -> None:
        """Settle a blocked job whose parents may have ended (at add time, or at start-up
        after a crash between a parent's end and this): cancelled when a parent failed or was
        cancelled (unless on_parent_failure is "run"), else pending once none is live. A parent
        no longer in the table counts as ended without failing (only a hand-edited state can
        lose one: the daemon never prunes a parent that a live job lists)."""
        assert job.state == BLOCKED
        self._settling, settling = True, self._settling
        try:
            if len(job.after) > 1:
                parent = self._failed_parent(job)
            elif job.after and job.on_parent_failure == "cancel":
                parent = self.jobs.get(job.after[0])
            else:
                parent = None
            if parent is not None and parent.state in (FAILED, CANCELLED):
                self._cancel_by(job, parent)
            elif job.id not in self.unfinished:
                self._unblock(job)
        finally:
            self._settling = settling
        if not settling:
            self._settle_children()

    def _unblock(self, job: Job) -> None:
        """BLOCKED -> PENDING: its delay counts from now; an explicit later run_at holds."""
        now = self.clock()
        self.transition(job, PENDING, "unblocked", changes={
            "run_at": max(job.run_at, now + (job.delay or 0.0)), "delay": None})

    def _cancel_by(self, job: Job, parent: Job) -> None:
        """BLOCKED -> CANCELLED because `parent` ended failed or cancelled (its children
        follow, through transition())."""
        error = "parent %d %s" % (parent.id, parent.state)
        self.transition(job, CANCELLED, changes={"error": error, "cancelled_by": parent.id},
                        error=error)

    def retry(self, job: Job, **log_fields) -> list[Job]:
        """A failed or cancelled job back: pending, or blocked while a parent is live; with it
        every descendant that was cancelled because of it, or of one put back here (blocked
        again, attempts 0). Returns the descendants put back (the caller checked room and key
        of `job`; a descendant whose key another live job holds now stays cancelled)."""
        now = self.clock()
        fresh = {"attempts": 0, "run_at": now, "started_at": None, "finished_at": None,
                 "exit_code": None, "error": None, "result": None, "pid": None,
                 "cancelled_by": None}
        state = BLOCKED if job.id in self.unfinished else PENDING
        self.transition(job, state, "blocked" if state == BLOCKED else "queued",
                        changes=fresh, **log_fields)
        back, todo, jobs = [], collections.deque([job.id]), self.jobs
        while todo:
            parent_id = todo.popleft()
            for child_id in list(self.children.get(parent_id, ())):
                child = jobs.get(child_id)
                if child is None or child.state != CANCELLED or child.cancelled_by != parent_id:
                    continue
                if child.key is not None and self.keys.get(child.key, child_id) != child_id:
                    continue
                self.transition(child, BLOCKED, changes=fresh, **log_fields)
                back.append(child)
                todo.append(child_id)
        self.enqueued += [job, *back]
        return back

    def retry_many(self, jobs: list[Job], uid: int | None) -> list[Job]:
        """`retry` with `where`: retry() of each of `jobs` (failed or cancelled). Those with no
        parent unfinished and no children (most) move to pending together, with their
        `queued` lines and one journal entry (a step of 10,000 in ~62 ms at 1M jobs; retry()
        each, ~118); the others go through retry(), which puts their descendants back too.
        Returns every job put back, descendants included."""
        assert TRANSITIONS[(FAILED, PENDING)] == TRANSITIONS[(CANCELLED, PENDING)] == ("queued",)
        now = self.clock()
        save, unindex, index, unfinished, children = (
            self._save, self._unindex, self._index, self.unfinished, self.children)
        plain, back = [], []
        for job in jobs:
            if job.state not in (FAILED, CANCELLED):    # put back already, as a descendant
                continue
            if job.key is not None and self.keys.get(job.key, job.id) != job.id:
                continue                        # another live job holds its key now
            if job.id in unfinished or job.id in children:
                back += [job, *self.retry(job, uid=uid)]
                continue
            save(job)
            unindex(job)
            job.state, job.attempts, job.run_at = PENDING, 0, now
            job.started_at = job.finished_at = job.exit_code = job.error = job.result = None
            job.pid = job.cancelled_by = None
            index(job, now)
            plain.append(job)
        if plain:
            self.log.queued(now, plain)
            self.store.append_records([job.id for job in plain],
                                      [_encode(job.stored()) for job in plain])
        self.enqueued += plain              # (retry() counted the others)
        return plain + back

    def descendants_to_retry(self, job: Job) -> int:
        """How many jobs retry(job) would put back with it (for the max_queued check)."""
        count, todo, jobs = 0, collections.deque([job.id]), self.jobs
        while todo:
            parent_id = todo.popleft()
            for child_id in self.children.get(parent_id, ()):
                child = jobs.get(child_id)
                if child is not None and child.state == CANCELLED \
                        and child.cancelled_by == parent_id:
                    count += 1
                    todo.append(child_id)
        return count

    def settle_orphans(self) -> int:
        """At start-up: settle every blocked job none of whose parents is live, or one of
        whose parents failed (a crash between a parent's end and the write of its children's
        settling: both are in one journal write, so only a hand-edited state dir or a lost
        parent leaves one). Reads the parents of blocked jobs only. Returns how many."""
        jobs, unfinished = self.jobs, self.unfinished
        stuck = [jobs[i] for i in sorted(self.by_state[BLOCKED]) if i not in unfinished
                 or jobs[i].on_parent_failure == "cancel" and any(
                     p in jobs and jobs[p].state in (FAILED, CANCELLED) for p in jobs[i].after)]
        for job in stuck:
            if job.state == BLOCKED:        # a cascade may have settled it meanwhile
                self.settle_blocked(job)
        return len(stuck)

    def update(self, job: Job, **changes) -> None:
        """Change fields other than `state` (e.g. the pid of a running attempt) and journal."""
        assert "state" not in changes
        self._save(job)
        for name, value in changes.items():
            setattr(job, name, value)
        self.store.append({"job": job.stored()})

    def cancel_many(self, jobs: list[Job], uid: int | None) -> None:
        """`cancel` with `where`: each of `jobs` (live) moves to cancelled as transition()
        would move it, with one journal entry for the lot (a step of 10,000 takes ~57 ms at
        1M jobs; a transition() each, ~106). Their children settle after, as for any end."""
        now = self.clock()
        save, unindex, index, changed = self._save, self._unindex, self._index, self.changed
        for job in jobs:
            assert (job.state, CANCELLED) in TRANSITIONS, "illegal transition %s -> %s (job " \
                "%d)" % (job.state, CANCELLED, job.id)
            save(job)
            unindex(job)
            job.state, job.finished_at = CANCELLED, now
            changed.append(job)
            index(job, now)
        self.log.moved(now, "cancelled", jobs, "" if uid is None else " uid=%d" % uid)
        self.store.append_records([job.id for job in jobs], [_encode(job.stored()) for job in jobs])
        children = self.children
        self._ended.extend(job for job in jobs if job.id in children)
        if not self._settling:
            self._settle_children()

    AMENDABLE = frozenset({"priority", "run_at", "delay", "queue"})    # what `update` changes

    def amend(self, job: Job, changes: dict) -> None:
        """The `update` op: change when, where or in which order a blocked or pending job runs
        (`AMENDABLE` fields), with no state move: off every index, changed, back on (a new
        heap entry in its queue, that queue's counts and by_queue), journaled; undo() puts it
        back as it was, queue included."""
        assert job.state in (BLOCKED, PENDING) and changes.keys() <= self.AMENDABLE
        self._save(job)
        self._unindex(job)
        old_queue = job.queue
        for name, value in changes.items():
            setattr(job, name, value)
        if job.queue != old_queue:
            self._move_queue(job.id, old_queue, job.queue)
        self._index(job)
        self.store.append({"job": job.stored()})

    def _move_queue(self, job_id: int, old: str, new: str) -> None:
        """by_queue: job_id leaves queue `old` for `new` (ascending lists both)."""
        ids = self.by_queue.get(old)
        if ids:
            at = bisect.bisect_left(ids, job_id)
            if at < len(ids) and ids[at] == job_id:
                del ids[at]
            if not ids:
                del self.by_queue[old]
        bisect.insort(self.by_queue.setdefault(new, []), job_id)

    def requeue(self, job: Job) -> None:
        """Put a pending job that pop_due() handed out back on its heap."""
        assert job.state == PENDING
        self._unindex(job)
        self._index(job)

    def set_paused(self, paused: bool, queue: str | None = None) -> None:
        """Pause or resume the whole daemon, or with `queue` that queue alone."""
        if queue is not None:
            target = self.scheduler.queue(queue)
            if self._undo is not None and queue not in self._undo_queues:
                self._undo_queues[queue] = target.paused
            target.paused = paused
            self.store.append({"queue": {"name": queue, "paused": paused}})
            return
        if self._undo is not None and self._undo_paused is None:
            self._undo_paused = self.paused
        self.scheduler.paused = paused
        self.store.append({"paused": paused})

    def remove(self, jobs: list[Job]) -> None:
        """Forget finished jobs (prune)."""
        for job in jobs:
            assert job.state in FINISHED
            self._save(job)
            self._unindex(job)
            del self.jobs[job.id]
            if job.after:
                self._unlink(job)
                self.unfinished.pop(job.id, None)
            self.kept.discard(job.id)
        gone = {job.id for job in jobs}
        self.ids = self._without(self.ids, gone)
        for queue in {job.queue for job in jobs}:
            kept = self._without(self.by_queue.get(queue, []), gone)
            if kept:
                self.by_queue[queue] = kept
            else:
                self.by_queue.pop(queue, None)
        for schedule in {job.schedule for job in jobs if job.schedule is not None}:
            kept = self._without(self.by_schedule.get(schedule, []), gone)
            if kept:
                self.by_schedule[schedule] = kept
            else:
                self.by_schedule.pop(schedule, None)
        if self.by_target is not None:           # maybe still being built: maybe absent
            for target in {job.target for job in jobs}:
                kept = self._without(self.by_target.get(target, []), gone)
                if kept:
                    self.by_target[target] = kept
                else:
                    self.by_target.pop(target, None)
        self.store.append({"del": sorted(gone)})

    # -- undo (a failed journal write) -------------------------------------------------------

    def track(self) -> None:
        self._undo = {}
        self._undo_paused = None
        self._undo_queues = {}
        self._ended_saved = list(self._ended)
        if self.schedules is not None:
            self.schedules.track()

    def untrack(self) -> None:
        self._undo = None
        self._undo_paused = None
        self._undo_queues = {}
        self._ended_saved = []
        if self.schedules is not None:
            self.schedules.untrack()

    def _save(self, job: Job) -> None:
        if self._undo is not None and job.id not in self._undo:
            self._undo[job.id] = (job, _all_values(job))

    def undo(self) -> None:
        """Put every job changed since track() back as it was (nothing if not tracking)."""
        if self._undo is None:
            return
        # The parents still to settle as they were: a slice of children undone is settled again
        self._ended = collections.deque(self._ended_saved)
        for job_id, (job, values) in reversed(list(self._undo.items())):
            present = self.jobs.get(job_id) is job
            if present and job.state is not None:
                self._unindex(job)
            if values is None:                  # created since track(): forget it
                if present:
                    if job.after:
                        self._unlink(job)
                        self.unfinished.pop(job_id, None)
                    del self.jobs[job_id]
                    self._forget_id(self.ids, job_id)
                    self._forget_id(self.by_queue[job.queue], job_id)
                    if not self.by_queue[job.queue]:
                        del self.by_queue[job.queue]
                    if job.schedule is not None:
                        self._forget_id(self.by_schedule[job.schedule], job_id)
                        if not self.by_schedule[job.schedule]:
                            del self.by_schedule[job.schedule]
                    if self.by_target is not None:
                        self._forget_id(self.by_target[job.target], job_id)
                        if not self.by_target[job.target]:
                            del self.by_target[job.target]
                continue
            token = job.token                   # past every heap entry made for it meanwhile
            queue = job.queue
            for name, value in zip(Job.__slots__, values):
                setattr(job, name, value)
            job.token = token + 1               # (the saved token may equal one of them)
            if present and job.queue != queue:  # moved by amend(): back to its old queue
                self._move_queue(job_id, queue, job.queue)
            if not present:                     # pruned since track(): back in
                self.jobs[job_id] = job
                bisect.insort(self.ids, job_id)
                bisect.insort(self.by_queue.setdefault(job.queue, []), job_id)
                if job.schedule is not None:
                    bisect.insort(self.by_schedule.setdefault(job.schedule, []), job_id)
                if self.by_target is not None:
                    bisect.insort(self.by_target.setdefault(job.target, []), job_id)
                if job.after:                   # its edges back, and how many parents are live
                    self._link(job)
                    live = sum(1 for p in job.after
                               if p in self.jobs and self.jobs[p].state in LIVE)
                    if live:
                        self.unfinished[job_id] = live
            self._index(job)
        if self._undo_paused is not None:
            self.scheduler.paused = self._undo_paused
        for queue, paused in self._undo_queues.items():
            self.scheduler.queue(queue).paused = paused
        if self.schedules is not None:
            self.schedules.undo()
        self.untrack()

    @staticmethod
    def _ids_after(ids: list[int], after_id: int):
        """The ids > after_id of an ascending list, lazily (no copy, no skipping through)."""
        return map(ids.__getitem__, range(bisect.bisect_right(ids, after_id), len(ids)))

    @staticmethod
    def _ids_before(ids: list[int], before_id: int):
        """The ids < before_id of an ascending list, descending, lazily (`list` newest first)."""
        return map(ids.__getitem__, range(bisect.bisect_left(ids, before_id) - 1, -1, -1))

    def total(self, state: str | None, queue: str | None, schedule: str | None = None) -> int:
        """How many jobs are in `state` and `queue` (None: any), from the counters alone:
        a `list` reply's `total` never walks the table. Of one schedule's jobs (a few
        thousand at most: one a fire, pruned after keep_finished) their ids are read."""
        if schedule is not None:
            ids, jobs = self.by_schedule.get(schedule, ()), self.jobs
            if state is None and queue is None:
                return len(ids)
            return sum(1 for i in ids if (state is None or jobs[i].state == state)
                       and (queue is None or jobs[i].queue == queue))
        if queue is None:
            return len(self.jobs) if state is None else self.counts[state]
        counts = self.scheduler.queues[queue].counts if queue in self.scheduler.queues else {}
        return sum(counts.values()) if state is None else counts.get(state, 0)

    @staticmethod
    def _without(ids: list[int], gone: set[int]) -> list[int]:
        """The ascending `ids` without those in `gone`. Jobs finished together mostly have
        neighbouring ids: a few runs of them are cut out in place (a memmove each, ~1 ms at
        1M); scattered ones cost one pass that copies the rest (~20 ms at 1M: every id it
        keeps is touched), never a set lookup per id of a million."""
        runs: list[list[int]] = []          # [start, end) positions in ids, descending
        for job_id in sorted(gone, reverse=True):
            pos = bisect.bisect_left(ids, job_id, 0, runs[-1][0] if runs else len(ids))
            if pos == len(ids) or ids[pos] != job_id:
                continue                    # not there (cannot happen): nothing to cut
            if runs and runs[-1][0] == pos + 1:
                runs[-1][0] = pos
            else:
                runs.append([pos, pos + 1])
            if len(runs) > JobTable.IN_PLACE_RUNS:
                return [i for i in ids if i not in gone]
        for start, end in runs:             # from the end: earlier positions stay right
            del ids[start:end]
        return ids

    @staticmethod
    def _forget_id(ids: list[int], job_id: int) -> None:
        if ids[-1] == job_id:                   # the newest: at the end (no O(n) remove)
            ids.pop()
        else:
            ids.remove(job_id)

    # -- questions ---------------------------------------------------------------------------

    def index_targets(self, deadline: float) -> bool:
        """Build by_target until `deadline` (time.monotonic()); True once it is complete.
        A million jobs take most of a second: built at once, that would hold the loop. From
        the start on, create(), remove() and undo() keep what is there up to date, while this
        adds the jobs that existed before, in id order (an id that undo() put back already is
        not added twice)."""
        if self.by_target is None:
            self.by_target = {}
            self._targets_done, self._targets_upto = 0, self.ids[-1] if self.ids else 0
        jobs, by_target, upto = self.jobs, self.by_target, self._targets_upto
        while self._targets_done < upto:
            start = bisect.bisect_right(self.ids, self._targets_done)
            chunk = self.ids[start:start + 2048]
            if not chunk:
                break
            for job_id in chunk:
                if job_id > upto:
                    break
                ids = by_target.setdefault(jobs[job_id].target, [])
                if not ids or ids[-1] < job_id:
                    ids.append(job_id)
                else:                           # jobs made since the start are there already
                    at = bisect.bisect_left(ids, job_id)
                    if at == len(ids) or ids[at] != job_id:
                        ids.insert(at, job_id)
            self._targets_done = chunk[-1]
            if time.monotonic() >= deadline:
                return self._targets_done >= upto
        self._targets_done = upto
        return True

    # The scheduler's questions, asked of the table by tests that step a table alone.

    def pop_due(self, now: float) -> Job | None:
        return self.scheduler.pop_due(now)

    def has_due(self, now: float) -> bool:
        return self.scheduler.has_due(now)

    def next_run_at(self) -> float | None:
        return self.scheduler.next_run_at()

    def finished_before(self, cutoff: float, busy=(), limit: int | None = None) -> list[Job]:
        """Finished jobs whose finished_at <= cutoff (for prune), oldest first, at most `limit`,
        except those in `busy` (their processes are still being killed), which stay for a
        later prune."""
        found, seen, later = [], set(), []
        while self.finished and self.finished[0][0] <= cutoff \
                and (limit is None or len(found) < limit):
            entry = heapq.heappop(self.finished)
            finished_at, job_id = entry
            job = self.jobs.get(job_id)
            if job is None or job.state not in FINISHED or job.finished_at != finished_at \
                    or job_id in seen or job_id in self.kept:   # stale, or a second entry
                continue                        # pushed by undo, or held for a live child
            seen.add(job_id)
            if job_id in self.live_children:    # a live job lists it: pushed back once the
                self.kept.add(job_id)           # last one ends (_count_live), not before
                continue
            if job_id in busy:
                later.append(entry)
            else:
                found.append(job)
        for entry in later:
            heapq.heappush(self.finished, entry)
        return found

    def select(self, state: str | None, pattern: str | None, after_id: int, limit: int,
               targets: set[str] | None = None, queue: str | None = None,
               schedule: str | None = None, before_id: int | None = None) -> list[Job]:
        """Up to `limit` jobs with id > after_id, ascending (or, given `before_id`, with
        id < before_id, descending: newest first), in `state`, matching `pattern` (at once:
        the daemon runs a PatternQuery a slice per pass instead) or of one of `targets` (a
        few, in the index), in `queue`, queued by `schedule`: read from the smallest of every
        id (or the queue's, or the schedule's), the state's ids and those targets' ids."""
        if pattern is not None:
            query = PatternQuery(self, state, pattern, after_id, limit, queue, before_id,
                                 schedule=schedule)
            query.step(math.inf)
            return query.jobs
        desc = before_id is not None
        if state is not None and self.total(state, queue) == 0:
            return []                           # none anywhere: no walk looking for them
        jobs = self.jobs
        if targets is not None:
            if not targets:
                return []
            self.index_targets(math.inf)        # a few targets: the index already is complete
        base = self.ids if queue is None else self.by_queue.get(queue, [])
        if schedule is not None:
            base = self.by_schedule.get(schedule, [])
        in_targets = len(base) if targets is None else \
            sum(len(self.by_target[t]) for t in targets)
        if state is not None and self.counts[state] * 8 < in_targets:
            # A rare state: its own ids (unordered), the smallest (largest) `limit` that match.
            pick = heapq.nlargest if desc else heapq.nsmallest
            found = pick(limit, (
                i for i in self.by_state[state]
                if (i < before_id if desc else i > after_id)
                and (targets is None or jobs[i].target in targets)
                and (queue is None or jobs[i].queue == queue)
                and (schedule is None or jobs[i].schedule == schedule)))
            return [jobs[i] for i in found]
        if targets is None:
            candidates = self._ids_before(base, before_id) if desc else \
                self._ids_after(base, after_id)
        elif desc:
            candidates = heapq.merge(*(self._ids_before(self.by_target[t], before_id)
                                       for t in targets), reverse=True)
        else:
            candidates = heapq.merge(*(self._ids_after(self.by_target[t], after_id)
                                       for t in targets))
        out = []
        for job_id in candidates:
            job = jobs[job_id]
            if (state is None or job.state == state) and (queue is None or job.queue == queue) \
                    and (schedule is None or job.schedule == schedule):
                out.append(job)
                if len(out) >= limit:
                    break
        return out


class PatternQuery:
    """One `list` with a `target` pattern, worked through a slice at a time: step(deadline)
    returns True once `jobs` holds the answer. Translating a pattern, compiling it, building
    the by_target index and matching it against 200k distinct targets each can take longer
    than the loop may be held (SPEC §3: 100 ms), so the daemon runs each query a slice per
    loop pass (Protocol.advance_queries) and answers it when it is done.

    The pattern is translated once and compiled by `re` (whose cache is bounded), never
    through fnmatch's own cache (32,768 compiled patterns of up to 1,024 characters each).
    The targets are those in the index when matching starts: a job added with a new target
    after the request arrived may be missing from the answer; one of a target seen, or
    acknowledged before the request, is in it.

    With `before_id` the page is the `limit` largest ids below it, newest first. With
    `count`, `total` is then counted too (how many jobs of the matched targets are in
    `state` and `queue`): a walk of those jobs' ids, also a slice per pass."""

    FEW_TARGETS = 64        # matched targets that JobTable.select merges in one go
    COUNT_CHUNK = 4096      # ids counted between two looks at the clock

    def __init__(self, table: JobTable, state: str | None, pattern: str, after_id: int,
                 limit: int, queue: str | None = None, before_id: int | None = None,
                 count: bool = False, schedule: str | None = None):
        self.table, self.state, self.pattern, self.queue = table, state, pattern, queue
        self.schedule = schedule
        self.after_id, self.limit, self.before_id = after_id, limit, before_id
        self.regex: re.Pattern | None = None
        self.targets: list[str] | None = None   # the index's targets when matching started
        self.position = 0                       # of the next target to match
        self.matched: list[str] = []
        self.collect = None                     # a generator: the ids of the answer
        # A min-heap of keys: -id ascending (it keeps the smallest ids), id descending.
        self.found: list[int] = []
        self.jobs: list[Job] | None = None
        self.counting = None if count else iter(())     # a generator: total, a slice at a time
        self.total = 0

    def step(self, deadline: float) -> bool:
        table = self.table
        if self.regex is None:
            self.regex = re.compile(fnmatch.translate(self.pattern))
            if time.monotonic() >= deadline:
                return False
        if self.targets is None:
            if not table.index_targets(deadline):
                return False
            self.targets = list(table.by_target)
        match, targets = self.regex.match, self.targets
        while self.position < len(targets):
            end = self.position + 512
            self.matched.extend(filter(match, targets[self.position:end]))
            self.position = end
            if time.monotonic() >= deadline:
                return False
        if self.jobs is None:
            if self.collect is None:
                if len(self.matched) <= self.FEW_TARGETS:
                    present = {t for t in self.matched if t in table.by_target}  # none pruned?
                    self.jobs = table.select(self.state, None, self.after_id, self.limit,
                                             targets=present, queue=self.queue,
                                             schedule=self.schedule, before_id=self.before_id)
                else:
                    self.collect = self._collect(self.matched)
            if self.jobs is None:
                for _ in self.collect:
                    if time.monotonic() >= deadline:
                        return False
                desc = self.before_id is not None
                ids = sorted({i if desc else -i for i in self.found}, reverse=desc)
                jobs = table.jobs
                self.jobs = [jobs[i] for i in ids if i in jobs and
                             (self.state is None or jobs[i].state == self.state)
                             and (self.queue is None or jobs[i].queue == self.queue)
                             and (self.schedule is None or jobs[i].schedule == self.schedule)]
        if self.counting is None:
            self.counting = self._count(self.matched)
        for _ in self.counting:
            if time.monotonic() >= deadline:
                return False
        return True

    def _count(self, targets: list[str]):
        """Add to self.total the jobs of `targets` in `state` and `queue`; yields now and
        then. Without a filter a target's list length is its count."""
        table, state, queue, schedule = self.table, self.state, self.queue, self.schedule
        jobs, chunk = table.jobs, self.COUNT_CHUNK
        for n, target in enumerate(targets):
            ids = table.by_target.get(target)
            if not ids:
                continue
            if state is None and queue is None and schedule is None:
                self.total += len(ids)
                if n % chunk == chunk - 1:
                    yield
                continue
            for start in range(0, len(ids), chunk):
                for job_id in ids[start:start + chunk]:     # a copy: the list may change
                    job = jobs.get(job_id)
                    if job is not None and (state is None or job.state == state) \
                            and (queue is None or job.queue == queue) \
                            and (schedule is None or job.schedule == schedule):
                        self.total += 1
                yield

    def _collect(self, targets: list[str]):
        """Keep in self.found the `limit` smallest ids > after_id of `targets` in `state`;
        yields now and then to let step() look at the clock. Between two yields the index
        may change: each list is read again, from the last id seen."""
        table, state, limit, found = self.table, self.state, self.limit, self.found
        queue, schedule = self.queue, self.schedule
        jobs = table.jobs
        desc = self.before_id is not None
        sign = 1 if desc else -1                # key = sign * id; found[0] is the worst kept
        for n, target in enumerate(targets):
            last = self.before_id if desc else self.after_id
            while True:
                ids = table.by_target.get(target)
                if not ids:
                    break
                if desc:                        # walked from the newest down
                    end = bisect.bisect_left(ids, last)
                    chunk = ids[max(0, end - 256):end][::-1]
                else:
                    start = bisect.bisect_right(ids, last)
                    chunk = ids[start:start + 256]
                full = False
                for job_id in chunk:
                    key = sign * job_id
                    if len(found) >= limit and key < found[0]:
                        full = True             # the rest of this list is further still
                        break
                    job = jobs.get(job_id)
                    if job is not None and (state is None or job.state == state) \
                            and (queue is None or job.queue == queue) \
                            and (schedule is None or job.schedule == schedule):
                        if len(found) < limit:
                            heapq.heappush(found, key)
                        else:
                            heapq.heappushpop(found, key)
                if full or len(chunk) < 256:
                    break
                last = chunk[-1]
                yield
            if n % 64 == 63:
                yield


class BulkChange:
    """A `cancel` or `retry` with `where` under way: gather() finds the next matching jobs, a
    state at a time in ascending id order from a cursor (a pattern through a PatternQuery, a
    slice per pass), until BULK_STEP are found or none is left; the Protocol changes them in
    one durable step (Protocol.advance_bulk) and gathers again, and answers `ids` after the
    last. A job changed no longer matches (cancelled is not live; retried is not failed), so
    after a crash between steps the same request again finds exactly the rest."""

    def __init__(self, op: str, states: tuple[str, ...], pattern: str | None,
                 queue: str | None, slot: list, conn: "Connection | None", uid: int | None,
                 schedule: str | None = None):
        self.op, self.states, self.pattern, self.queue = op, states, pattern, queue
        self.schedule = schedule
        self.slot, self.conn, self.uid = slot, conn, uid
        self.state_at = 0                       # states[state_at] is being read, from `cursor`
        self.cursor = 0
        self.query: PatternQuery | None = None
        self.found: list[Job] = []              # the next step's jobs
        self.ids: list[int] = []                # changed in the steps made durable (or this one)
        self.durable = 0                        # of `ids`, those whose step was committed
        self.encoded: list[bytes] = []          # `ids` as JSON, a piece per step: 1M ids
                                                # encoded at once would hold the loop ~90 ms

    @property
    def exhausted(self) -> bool:
        return self.state_at >= len(self.states)

    def gather(self, table: JobTable, deadline: float) -> bool:
        """Fill `found` (BULK_STEP at most); True once the step is ready: full, or every
        matching job found. False: a pattern query goes on in the next pass."""
        while not self.exhausted and len(self.found) < BULK_STEP:
            state, want = self.states[self.state_at], BULK_STEP - len(self.found)
            # One more than fits: if it is there, this state goes on in the next step; if
            # not, the step is the last one (exactly BULK_STEP jobs are one durable change).
            if self.pattern is None:
                jobs = table.select(state, None, self.cursor, want + 1, queue=self.queue,
                                    schedule=self.schedule)
            else:
                if self.query is None:
                    self.query = PatternQuery(table, state, self.pattern, self.cursor, want + 1,
                                              self.queue, schedule=self.schedule)
                if not self.query.step(deadline):
                    return False
                jobs, self.query = self.query.jobs, None
            if len(jobs) <= want:
                self.state_at, self.cursor = self.state_at + 1, 0
            else:
                del jobs[want:]
                self.cursor = jobs[-1].id
            self.found.extend(jobs)
        return True

    def reply(self) -> bytes:
        """The answer after the last step: {"ok": true, "ids": [...]}, as encode_reply()."""
        return b'{"ok":true,"ids":[' + b",".join(part for part in self.encoded if part) \
            + b"]}\n"

    def take(self) -> list[Job]:
        """The step's jobs that still match (one may have changed state since it was found),
        ascending: all of them when the whole request is this one step (at most BULK_STEP
        jobs: one durable change), else BULK_SLICE at most, the rest kept in `found` for the
        next step."""
        states = self.states
        found = sorted((job for job in self.found if job.state in states),
                       key=operator.attrgetter("id"))
        if (self.exhausted and not self.ids) or len(found) <= BULK_SLICE:
            self.found = []
            return found
        self.found = found[BULK_SLICE:]
        return found[:BULK_SLICE]

    @property
    def done(self) -> bool:
        """Every matching job found and changed (the reply may go once this step is durable)."""
        return self.exhausted and not self.found


####################################################################################################
#  The job process (this code runs in the child, never in the daemon)
####################################################################################################
#
# A child starts as `python -I -c CHILD_BOOTSTRAP jobrunner-job ID ATTEMPT` with fd 0 = /dev/null,
# fds 1 and 2 = the output pipe, fd 3 = a socket to the daemon. The daemon sends two lines on fd 3:
# CHILD_SOURCE (as a JSON string) and the attempt's spec (JSON). The child writes one JSON line
# back before it exits: {"status": "ok", "result": ...}, {"status": "error", ...} (the job raised:
# retryable) or {"status": "permanent", ...} (the target cannot run here: not retried).
#
# Why a string and not a function of this module: the child must never import jobrunnerd (the
# daemon's module would run its imports and constants in every job process, and a job could
# reach the daemon's code), and a spawned child is a bare `python -I` that has only what it is
# sent. A string sent over fd 3 is the whole of what runs before the job's own code.

CHILD_BOOTSTRAP = ("import os,json;_chan=os.fdopen(3,'rb',closefd=False);"
                   "exec(json.loads(_chan.readline()))")

CHILD_SOURCE = ("MAX_ERROR, MAX_TB, MAX_RESULT, MAX_DEPTH = %d, %d, %d, %d\n"
                % (MAX_ERROR_CHARS, MAX_TRACEBACK_BYTES, MAX_RESULT_BYTES, MAX_RESULT_DEPTH)) + r'''
import json, os, signal, sys

def _send(msg):
    data = (json.dumps(msg, ensure_ascii=False) + "\n").encode("utf-8", "replace")
    try:
        while data:
            data = data[os.write(3, data):]
        os.close(3)
    except OSError:
        pass

def _one_line(exc):
    text = "%s: %s" % (type(exc).__name__, exc)
    return " ".join(text.split())[:MAX_ERROR]

def _tail(text, limit):
    """The end of `text` that JSON-encodes in at most `limit` bytes (escapes count too)."""
    text = text[-limit:]
    while len(json.dumps(text, ensure_ascii=False).encode("utf-8", "replace")) > limit:
        text = text[len(text) // 8 + 1:]
    return text

def _fail(status, error, tb=None):
    _send({"status": status, "error": error, "traceback": _tail(tb or "", MAX_TB)})
    sys.stdout.flush()
    os._exit(2 if status == "permanent" else 1)

def _exit_status(exc):
    """The exit status a SystemExit that ended the job stands for, as at an interpreter's
    exit: its code if an int (None: 0; past a C long: -1, so 255), else 1 with the code
    printed to stderr."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        code = int.__index__(exc.code)          # (a subclass's own methods do not run)
        return code if -2 ** 63 <= code < 2 ** 63 else -1
    print(exc.code, file=sys.stderr)
    return 1

def _exit(status):
    """End a process forked for a job (a zygote's child, a spare, a worker that goes) as an
    interpreter's exit would: atexit functions, output flushed; then os._exit, which leaves
    the zygote's own state (inherited, not ours) alone."""
    try:
        import atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(status & 0xFF)

def _too_deep(value, limit):
    """As the daemon's too_deep(): it refuses a report that nests deeper."""
    level = [value]
    for _ in range(limit):
        inner = []
        for container in level:
            for item in (container if type(container) is list else container.values()):
                if type(item) is list or type(item) is dict:
                    inner.append(item)
        if not inner:
            return False
        level = inner
    return True

_NOT_FOUND = object()

def _lookup(cls, name):
    """cls.name as stored in the class or a base (its MRO), read from their __dict__: no
    descriptor, no metaclass __getattr__ runs (a plain getattr() could run either)."""
    for base in type.__dict__["__mro__"].__get__(cls):
        found = type.__dict__["__dict__"].__get__(base).get(name, _NOT_FOUND)
        if found is not _NOT_FOUND:
            return found
    return _NOT_FOUND

def _resolve(module, module_name, attr):
    """(the object `attr` names in `module`, None) or (None, why not). Every step must be a
    class or a Python function that the module itself defines: never a module, a builtin or a
    name the module imported, so that `examples.jobs:os.system` cannot walk out of the
    allowed module. Names are read from __dict__, so no job code runs during the walk."""
    import types
    if not issubclass(type(module), types.ModuleType):
        return None, "%s is not a module" % module_name
    obj, path = module, module_name + ":"
    names = types.ModuleType.__dict__["__dict__"].__get__(module)
    for part in attr.split("."):
        if part.startswith("_"):
            return None, "the name %r starts with '_'" % part
        obj = names.get(part, _NOT_FOUND) if obj is module else _lookup(obj, part)
        path += part
        if obj is _NOT_FOUND:
            return None, "%s is not defined" % path
        if issubclass(type(obj), type):
            owner = type.__dict__["__dict__"].__get__(obj).get("__module__")
        elif type(obj) is types.FunctionType:
            owner = obj.__module__
        else:
            return None, "%s is a %s, not a class or function" % (path, type(obj).__name__)
        if type(owner) is not str:          # compared as is, its __eq__ could run code
            return None, "%s has no module name" % path
        if owner != module_name:
            return None, "%s is defined in %s, not in %s" % (path, owner, module_name)
        path += "."
    return obj, None

_LIMITS = {"cpu": "RLIMIT_CPU", "memory": "RLIMIT_AS", "nofile": "RLIMIT_NOFILE",
           "fsize": "RLIMIT_FSIZE"}       # `limits` keys (SPEC section 5) -> resource names

def _argv_area():
    """(arg_start, arg_end): where our argv lies in our memory (/proc/self/stat)."""
    fd = os.open("/proc/self/stat", os.O_RDONLY)
    try:
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[45]), int(fields[46])

def _write_argv(area, title, mark):
    """Our argv (what ps and /proc/PID/cmdline show) becomes `title`, cut to fit, then `mark`
    (bytes, kept whole): written over the old one in place."""
    import ctypes
    start, end = area
    room = end - start - len(mark) - 1
    data = title.encode("utf-8", "replace")[:room].replace(b"\0", b" ") + b"\0" + mark
    ctypes.memmove(start, data.ljust(end - start, b"\0")[:end - start], end - start)

class _SpecLine:
    """fd 3 as a forked job process reads it (a zygote's child, a spare, a worker): one line
    (the job spec), then done. Not a buffered file object made per attempt (~0.08 ms)."""

    def readline(self):
        chunks = []
        while True:
            chunk = os.read(3, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            if b"\n" in chunk:
                data = b"".join(chunks)
                return data[:data.index(b"\n") + 1]

    def close(self):
        pass

def _comm(title):
    """The name in top (/proc/self/comm, 15 bytes) of an attempt's title: "jobrunner: job 42
    attempt 1/3 pkg.mod:Attr" -> "job 42 1/3"; None for another title."""
    words = title.split()
    return ("job %s %s" % (words[2], words[4]))[:15] if len(words) > 4 else None

def _retitle(title, prctl):
    """Name this process in ps and top: /proc/self/comm (15 bytes: "job 42 1/3") and the
    argv (cmdline) "jobrunner: job 42 attempt 1/3 pkg.mod:Attr", written over ours in place.
    The mark the daemon finds attempts by ("jobrunner-job ID N", see argv_mark) stays, after
    the title, and every process the job forks without exec shows both. Best effort."""
    if not title:
        return
    try:
        prctl(15, (_comm(title) or "").encode(), 0, 0, 0)      # PR_SET_NAME
    except Exception:
        pass
    try:
        import ctypes
        area = _argv_area()
        old = ctypes.string_at(area[0], area[1] - area[0])
        at = old.find(b"\0jobrunner-job\0")
        if at < 0:
            return
        mark = b"\0".join(old[at + 1:].split(b"\0")[:3]) + b"\0"
        if area[1] - area[0] - len(mark) - 1 >= 16:
            _write_argv(area, title, mark)
    except Exception:
        pass

def _start():
    spec = json.loads(_chan.readline())
    _chan.close()
    os.set_inheritable(3, False)          # the job's own children must not hold the channel
    try:                                  # die with the daemon: no orphan if it crashes now
        prctl = globals().get("_prctl")   # the zygote looked it up once for all its children
        if prctl is None:
            import ctypes
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except Exception:
        prctl = None
    if os.getppid() != spec["parent"]:
        os._exit(1)
    _retitle(spec.get("title"), prctl)
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for name, value in spec["limits"].items():
        which = getattr(resource, _LIMITS[name])
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
    paths = spec["paths"]
    if sys.path[:len(paths)] != paths:    # (a zygote's child has them from the zygote)
        sys.path[:0] = paths
    sys.stdout.reconfigure(line_buffering=True)
    _main(spec)

def _main(spec):
    """Check, import, resolve and call the target; report. What a reused worker (SPEC 2d) runs
    per attempt: it returns after an "ok" report, and exits on any failure (_fail)."""
    sys.argv = ["jobrunner-job:" + spec["target"]]
    import fnmatch, traceback
    target, method = spec["target"], spec["method"]
    if not any(fnmatch.fnmatchcase(target, p) for p in spec["allow"]):
        _fail("permanent", "target %s is not allowed by the daemon's allow list" % target)
    module_name, _, attr = target.partition(":")
    try:
        import importlib
        obj = importlib.import_module(module_name)
    except BaseException as exc:
        _fail("permanent", "cannot import %s: %s" % (module_name, _one_line(exc)),
              traceback.format_exc())
    obj, why = _resolve(obj, module_name, attr)
    if why is not None:
        _fail("permanent", "cannot resolve %s: %s" % (target, why))
    if issubclass(type(obj), type):
        name = method or "handle"
        found = _lookup(obj, name)
        if name.startswith("_") or not (callable(found) or type(found) is classmethod):
            _fail("permanent", "%s has no method %r" % (target, name))
        try:
            func = getattr(obj(), name)
        except BaseException as exc:
            _fail("error", _one_line(exc), traceback.format_exc())
    elif callable(obj):
        if method is not None:
            _fail("permanent", "%s is a function: method must be absent or null, not %r"
                  % (target, method))
        func = obj
    else:
        _fail("permanent", "%s is not callable" % target)
    try:
        result = func(*spec["args"], **spec["kwargs"])
    except SystemExit:
        raise
    except BaseException as exc:
        _fail("error", _one_line(exc), traceback.format_exc())
    try:
        encoded = json.dumps(result, ensure_ascii=False, allow_nan=False).encode("utf-8")
        if len(encoded) > MAX_RESULT:
            raise ValueError("%d bytes encoded, more than %d" % (len(encoded), MAX_RESULT))
        result = json.loads(encoded)      # plain lists and dicts now: no cycle, no subclass
        if type(result) in (list, dict) and _too_deep(result, MAX_DEPTH):
            raise ValueError("it nests deeper than %d levels" % MAX_DEPTH)
    except RecursionError:
        print("[jobrunner] result not kept: it nests too deeply to encode", file=sys.stderr)
        result = None
    except Exception as exc:              # not JSON, cyclic, too large or too deep
        print("[jobrunner] result not kept: %s" % _one_line(exc), file=sys.stderr)
        result = None
    sys.stdout.flush()
    _send({"status": "ok", "result": result})

if __name__ == "__main__":      # a reused worker execs this source for its functions alone
    _start()
'''


####################################################################################################
#  Runner: child processes
####################################################################################################

class Loop:
    """A selector and a heap of timers (monotonic clock). Each registered fd carries
    (kind, callback): the daemon runs "internal" callbacks before "client" ones in a pass."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.watched: dict[int, tuple] = {}     # fd -> (events, kind, callback) as registered
        self.timers: list[list] = []
        self.seq = 0
        self.on_error = None                    # (where, exception) of a callback that raised

    def call(self, callback, *args) -> None:
        """Run one callback of the loop (selector or timer). An exception it raises goes to
        on_error and the loop goes on: a bug in one callback must not take the daemon, and
        every job it runs, down with it."""
        try:
            callback(*args)
        except Exception as exc:
            if self.on_error is None:
                raise
            func = getattr(callback, "func", callback)          # functools.partial
            self.on_error(getattr(func, "__qualname__", type(func).__name__), exc)

    def watch(self, fd: int, events: int, kind: str, callback) -> None:
        """Register or change; a no-op when nothing changes (clients re-watch every pass)."""
        now = (events, kind, callback)
        before = self.watched.get(fd)
        if before == now:
            return
        try:
            self.sel.modify(fd, events, (kind, callback))
        except KeyError:
            self.sel.register(fd, events, (kind, callback))
        self.watched[fd] = now

    def unwatch(self, fd: int) -> None:
        if self.watched.pop(fd, None) is not None:
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass

    def call_later(self, delay: float, callback, *args) -> list:
        self.seq += 1
        timer = [time.monotonic() + delay, self.seq, callback, args]
        heapq.heappush(self.timers, timer)
        return timer

    @staticmethod
    def cancel(timer: list | None) -> None:
        if timer is not None:       # its arguments go too: a cancelled timer stays in the heap
            timer[2:4] = [None, ()]  # until it is due, and must not keep an attempt alive

    def next_timer(self) -> float | None:
        while self.timers and self.timers[0][2] is None:
            heapq.heappop(self.timers)
        return self.timers[0][0] if self.timers else None

    def run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, callback, args = heapq.heappop(self.timers)
            if callback is not None:
                self.call(callback, *args)


class Attempt:
    """One attempt of a job: its process group, its pipes, and what the child reported."""

    __slots__ = ("job", "number", "token", "zygote", "pid", "pid_start", "out_fd", "out_file",
                 "out_size", "out_capped", "out_lost", "chan", "chan_out", "chan_in", "started",
                 "stop_reason", "timers", "status", "released", "header", "worker", "checked")

    def __init__(self, job: Job, number: int, token: int):
        self.job = job
        self.number = number                    # the attempt's number (1 = first)
        self.token = token                      # names it before its pid is known
        self.zygote: Zygote | None = None       # the fork server that made it, if any
        self.pid = self.pid_start = self.status = None
        self.out_fd = self.out_file = self.chan = None
        self.out_size = 0
        self.out_capped = False
        self.out_lost = 0                       # output bytes the disk refused, not yet noted
        self.chan_out = bytearray()             # the job spec, held until release()
        self.chan_in = bytearray()
        self.released = False
        self.started = time.monotonic()
        self.stop_reason: str | None = None     # "timeout", "cancel", "shutdown"
        self.timers: list = []
        self.header: str | None = None          # its header line, until written (Runner.note)
        self.worker: Worker | None = None       # the reused worker that runs it (SPEC §2d)
        self.checked: tuple | None = None       # (report(),) once the channel is closed

    def report(self) -> dict | None:
        """The child's last line on fd 3 as a checked report (see check_report()), None if it
        sent none, or {"status": "invalid", "error": why} when that line is not a report.
        Checked once after the channel is closed (nothing more can come)."""
        if self.checked is not None:
            return self.checked[0]
        report = self._report()
        if self.chan is None:
            self.checked = (report,)
        return report

    def _report(self) -> dict | None:
        if len(self.chan_in) >= MAX_REPORT_BYTES:   # the runner stopped reading there
            return invalid_report("at least %d bytes" % MAX_REPORT_BYTES)
        for line in reversed(bytes(self.chan_in).split(b"\n")):
            if line.strip():
                try:
                    return check_report(line)
                except ValueError as exc:
                    return invalid_report(str(exc))
        return None


REPORT_FIELDS = frozenset({"status", "error", "traceback", "result"})


def invalid_report(why: str) -> dict:
    """What attempt_ended() takes for a line on fd 3 that is not a report: a failed attempt."""
    return {"status": "invalid", "error": "the job process sent an invalid report: " + why}


def check_report(line: bytes) -> dict:
    """A child's report line -> the report, each field checked and cut to size, or ValueError
    saying what is wrong. Job code can write anything to fd 3: what is kept must fit the journal
    and the replies (no nesting past MAX_RESULT_DEPTH, no lone surrogates, no NaN, strings where
    strings go), or the daemon would crash on it, and again after each restart."""
    try:
        text = line.decode("utf-8")
        msg = _decode_request(text)
    except UnicodeDecodeError as exc:
        raise ValueError("not UTF-8 (byte %d)" % exc.start) from None
    except RecursionError:
        raise ValueError("it nests too deeply") from None
    except ValueError as exc:
        raise ValueError("not JSON (%s)" % " ".join(str(exc).split())[:100]) from None
    if type(msg) is not dict:
        raise ValueError("not a JSON object")
    if too_deep(msg, MAX_RESULT_DEPTH + 1):
        raise ValueError("it nests deeper than %d levels" % (MAX_RESULT_DEPTH + 1))
    if _SURROGATE_ESCAPE.search(text):
        try:
            _json_line(msg).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("it holds a lone UTF-16 surrogate") from None
    unknown = msg.keys() - REPORT_FIELDS
    if unknown:
        raise ValueError("unknown field %r" % min(unknown)[:40])
    status = msg.get("status")
    if type(status) is not str or status not in ("ok", "error", "permanent"):
        raise ValueError("status must be \"ok\", \"error\" or \"permanent\"")
    report = {"status": status}
    for name in ("error", "traceback"):
        value = msg.get(name)
        if value is not None and type(value) is not str:
            raise ValueError("%s must be a string, not %s" % (name, type(value).__name__))
        if value:
            report[name] = value
    if "error" in report:
        report["error"] = report["error"][:MAX_ERROR_CHARS]
    if "traceback" in report:                   # its end says where it happened: keep that
        report["traceback"] = report["traceback"].encode("utf-8")[-MAX_TRACEBACK_BYTES:] \
            .decode("utf-8", "ignore")
    if "result" in msg and status == "ok":
        size = len(_encode(msg["result"]).encode("utf-8"))
        if size > MAX_RESULT_BYTES:
            raise ValueError("result of %d bytes encoded, more than %d" % (size, MAX_RESULT_BYTES))
        report["result"] = msg["result"]
    return report


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): with the pid, names a process
    uniquely, so a recycled pid is never taken for one of ours."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def live_process_groups() -> set[int]:
    """The process groups that have a member which is not a zombie (from /proc)."""
    groups = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] not in (b"Z", b"X"):
                groups.add(int(fields[2]))
    return groups


def exit_status(pid: int, start: int | None) -> int | None:
    """The wait status of `pid` if it is a zombie (it exited; its parent has not collected
    it), from field 52 of /proc/PID/stat; None if it runs, is gone, or is not that process."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] != b"Z" or (start is not None and int(fields[19]) != start):
            return None
        return int(fields[49])
    except (OSError, ValueError, IndexError):
        return None


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- containment: what an attempt leaves behind ---------------------------------------------------
# Killing the attempt's process group misses whatever left it (setsid, a daemonising tool). The
# process that forks attempts (the zygote; the daemon itself for spawned attempts and for a
# zygote's orphans) is made a child subreaper: a descendant whose parent dies is re-parented to it,
# not to init, so every process an attempt started is, sooner or later, a descendant of ours. When
# an attempt ends, Containment sweeps the subreapers' own children that are not attempt processes
# and kills those of attempts that are over; as each victim is reaped its own children come to us
# in turn, and the next sweep takes them. Which attempt a process belongs to: the attempt's argv
# "jobrunner-job ID N" in /proc/PID/cmdline (a spawned attempt's own argv; a zygote child writes
# it into its argv, which every fork without exec shows too; the job's name for ps, written
# before it by _retitle(), leaves it in place), else JOBRUNNER_JOB_ID /
# JOBRUNNER_ATTEMPT in /proc/PID/environ (every descendant that exec'd something), else its
# birth time: none of the attempts running when it was born still runs. After a daemon crash
# the escaped processes went to init: find_leftovers() finds them by the same marks. No new
# environment variable: the job's environment stays the daemon's plus its two (SPEC §2).

PR_SET_CHILD_SUBREAPER = 36         # prctl(2): orphaned descendants come to us instead of init
ATTEMPT_ARGV = "jobrunner-job"      # argv mark of an attempt's process: "jobrunner-job ID N"
ATTEMPT_ARGV_ROOM = 64              # bytes a zygote keeps at the end of its argv for that mark
SWEEP_RETRY = 0.05                  # after a kill: the victims' own children come to us as they die
SWEEP_RETRY_MAX = 1.0               # backoff cap for one that survives SIGKILL a while (D state)
SWEEP_SPACING = 0.02                # s between sweeps at least: at hundreds of attempt ends a
                                    # second one sweep serves many (each costs ~50 us), and an
                                    # orphan outlives its attempt by this much at most


def become_subreaper() -> bool:
    """Make this process the child subreaper of everything it starts (Linux 3.4+)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def child_pids(pid: int) -> list[int]:
    """The children of process `pid` (its main thread's; ours have no other thread that
    forks), from one small /proc read."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid), "rb") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        if os.path.exists("/proc/%d" % pid):
            return children_by_scan(pid)    # a kernel without CONFIG_PROC_CHILDREN
        return []
    except OSError:
        return []


def children_by_scan(pid: int) -> list[int]:
    """The children of process `pid`, from the parent field of every process (slow)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat is not None and stat[1] == pid:
                found.append(int(name))
    return found


def proc_stat(pid: int) -> tuple[bytes, int, int, int] | None:
    """(state, ppid, pgid, start time in clock ticks) of a process, from /proc/PID/stat."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[2]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _mark(job: bytes | None, number: bytes | None) -> tuple[int, int] | None:
    if job and number and job.isdigit() and number.isdigit():
        return int(job), int(number)
    return None


def argv_mark(pid: int) -> tuple[int, int] | None:
    """(job id, attempt number) from "jobrunner-job ID N" in the argv of a process."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            items = f.read().split(b"\0")
        at = items.index(ATTEMPT_ARGV.encode())
    except (OSError, ValueError):
        return None
    return _mark(*(items[at + 1:at + 3] + [None, None])[:2])


def attempt_mark(pid: int) -> tuple[int, int] | None:
    """(job id, attempt number) a process carries: in its argv, else in its environment (the
    argv first: a zygote's own environment is the daemon's, which may carry marks of its own
    when the daemon itself runs as a job)."""
    mark = argv_mark(pid)
    if mark is not None:
        return mark
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            env = dict(item.partition(b"=")[::2] for item in f.read().split(b"\0"))
    except OSError:
        return None
    return _mark(env.get(b"JOBRUNNER_JOB_ID"), env.get(b"JOBRUNNER_ATTEMPT"))


def kill_process(pid: int, start: int, spare_groups: frozenset = frozenset()) -> bool:
    """SIGKILL process `pid` if it still is the one born at `start` (through a pidfd, so a
    recycled pid is never hit), and its process group (unless ours or one of `spare_groups`).
    False if it was gone."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        stat = proc_stat(pid)
        if stat is None or stat[3] != start:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        return False
    finally:
        os.close(fd)
    if stat[2] > 1 and stat[2] != os.getpgrp() and stat[2] not in spare_groups:
        kill_group(stat[2], signal.SIGKILL)
    return True


def ancestors() -> set[int]:
    """This process's ancestors, init included: where the orphans of a crashed daemon went."""
    found, pid = set(), os.getppid()
    while pid > 0 and pid not in found:
        found.add(pid)
        stat = proc_stat(pid)
        pid = stat[1] if stat else 0
    return found | {1}


def find_leftovers(attempts: dict[tuple[int, int], int]) -> list[tuple[int, int]]:
    """Live processes, (pid, start), of the attempts (job id, number) -> process start time
    that a crashed daemon left running: marked with one of them, born at or after its start,
    of our uid (any, if root), and orphaned (re-parented to one of our ancestors, init or a
    subreaper above us), not held by a live process tree such as another daemon's attempt
    that happens to carry the same numbers."""
    uid = os.getuid()
    above = ancestors()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        try:
            if uid != 0 and os.stat("/proc/%d" % pid).st_uid != uid:
                continue
        except OSError:
            continue
        mark = attempt_mark(pid)
        stat = proc_stat(pid)
        if mark not in attempts or stat is None or stat[0] in (b"Z", b"X") \
                or stat[3] < attempts[mark]:
            continue
        parent, seen = stat[1], set()
        while parent not in above and parent not in seen and attempt_mark(parent) == mark:
            seen.add(parent)
            parent_stat = proc_stat(parent)
            parent = parent_stat[1] if parent_stat else 1
        if parent in above:
            found.append((pid, stat[3]))
    return found


def boot_time() -> float:
    """When the host booted (epoch seconds, /proc/stat btime): process start times count from it."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def find_ended_leftovers(ended) -> list[tuple[int, int]]:
    """Live processes, (pid, start), that a crashed daemon's attempts left and it had not swept
    yet (its crash came between an attempt's end and the sweep after it): orphans (re-parented
    to one of our ancestors, init or a subreaper above us), of our uid (any, if root), marked
    with an attempt that `ended(mark, born)` says is over (`born`: the process's start, epoch
    seconds). It reads the children of our ancestors only: a few reads at every start-up."""
    uid, me = os.getuid(), os.getpid()
    boot, tick = boot_time(), os.sysconf("SC_CLK_TCK")
    found = []
    for pid in {pid for parent in ancestors() for pid in child_pids(parent)}:
        stat = proc_stat(pid)
        if pid == me or stat is None or stat[0] in (b"Z", b"X"):
            continue
        try:
            if uid != 0 and os.stat("/proc/%d" % pid).st_uid != uid:
                continue
        except OSError:
            continue
        mark = attempt_mark(pid)
        if mark is not None and ended(mark, boot + stat[3] / tick):
            found.append((pid, stat[3]))
    return found


class Containment:
    """Kills the processes of attempts that are over, in whatever group or session they went.

    For the Runner: schedule() after an attempt ended or an orphan was reaped (sweeps are
    coalesced into one per loop pass), reap() after SIGCHLD (the daemon's own adopted orphans,
    each by pid: never waitpid(-1), which could take a status someone else waits for), and
    finish() before the daemon exits. A sweep costs one small /proc read per subreaper when
    nothing is left over."""

    def __init__(self, runner: "Runner"):
        self.runner = runner
        self.timer: list | None = None
        self.retry = SWEEP_RETRY
        self.last_sweep = -math.inf         # monotonic
        self.adopted: set[int] = set()      # the daemon's own children that are no attempt
        # Birth of the first attempt's process: an unmarked process born before it is of no
        # attempt (e.g. a child of the program that embeds a Daemon, in a session of its own).
        self.first_birth: int | None = None

    def attempt_started(self, att: Attempt) -> None:
        """Note the birth of the first attempt, of all (for the daemon's adopted orphans) and
        of its zygote (for that zygote's children: a replacement's preload may start helpers
        long after the first attempt of all, and they belong to no attempt)."""
        if att.pid_start is None:
            return
        for owner in (self, att.zygote):
            if owner is not None and (owner.first_birth is None
                                      or att.pid_start < owner.first_birth):
                owner.first_birth = att.pid_start

    def schedule(self, delay: float = 0.0) -> None:
        if self.timer is None or self.timer[2] is None:
            delay = max(delay, self.last_sweep + SWEEP_SPACING - time.monotonic())
            self.timer = self.runner.loop.call_later(delay, self.sweep)

    def sweep(self) -> int:
        """Kill the leftovers among the subreapers' children; returns how many are alive."""
        self.timer = None
        self.last_sweep = time.monotonic()
        runner = self.runner
        running = {(att.job.id, att.number) for att in runner.active.values()}
        births = [att.pid_start for att in runner.active.values() if att.pid is not None]
        oldest = min(births, default=None) if None not in births else -1
        zygotes = {z.pid: z for z in runner.zygotes}
        spare = frozenset(zygotes) | {att.pid for att in runner.active.values() if att.pid} \
            | frozenset(runner.worker_pids)
        own_group = os.getpgrp()
        left = killed = 0
        deferred = False
        for parent in [os.getpid()] + sorted(zygotes):
            ours = parent == os.getpid()
            # A zygote's child whose pid has not come back yet is an attempt that may not have
            # marked its argv yet: a child without that mark is judged in a later sweep.
            forking = not ours and bool(zygotes[parent].pending)
            first_birth = self.first_birth if ours else zygotes[parent].first_birth
            for pid in child_pids(parent):
                if pid in runner.by_pid or pid in zygotes or pid in runner.worker_pids:
                    continue
                stat = proc_stat(pid)
                # A child of ours in our own group is none of an attempt's (those start in
                # their own group): e.g. a subprocess of the program that embeds a Daemon.
                if stat is None or (ours and stat[2] == own_group):
                    continue
                if stat[0] in (b"Z", b"X"):
                    if ours:
                        self.adopted.add(pid)
                    continue
                if forking and argv_mark(pid) is None:
                    deferred = True
                    continue
                mark = attempt_mark(pid)
                if mark in running if mark is not None else \
                        (first_birth is None or stat[3] <= first_birth
                         or oldest is not None and (oldest < 0 or oldest <= stat[3])):
                    continue                # of an attempt still running (or may be), or of none
                left += 1
                if ours:
                    self.adopted.add(pid)
                killed += kill_process(pid, stat[3], spare)
        self.reap()
        if killed or deferred:
            self.schedule(self.retry)
            self.retry = min(self.retry * 2, SWEEP_RETRY_MAX)
        else:
            self.retry = SWEEP_RETRY
        return left

    def reap(self) -> None:
        for pid in list(self.adopted):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.adopted.discard(pid)
                self.schedule()             # its children were re-parented to us: next sweep

    def finish(self, timeout: float) -> None:
        """Before the daemon exits: sweep until nothing of an ended attempt is left."""
        deadline = time.monotonic() + timeout
        while self.sweep() and time.monotonic() < deadline:
            time.sleep(0.01)
        Loop.cancel(self.timer)
        self.timer = None


def _fd_above(fd: int, highest: int) -> int:
    """`fd`, or a close-on-exec copy of it numbered above `highest` (then `fd` is closed)."""
    if fd > highest:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, highest + 1)
    finally:
        os.close(fd)


# The zygote's source and config come in a memfd at fd 4 (any size, and no write that could
# block the daemon); the SEQPACKET socket at fd 3 then carries only small messages.
ZYGOTE_BOOTSTRAP = ("import os,json,socket;_ctl=socket.socket(fileno=3);"
                    "_f=os.fdopen(4,'rb');_conf=json.loads(_f.read());_f.close();del _f;"
                    "exec(_conf.pop('source'))")
ZYGOTE_MAX_MESSAGE = 64 * 1024      # one message from the zygote; a longer one means it is broken
ZYGOTE_MAX_WARNING = 4000           # the zygote cuts a warning (a preload's error) to this many
ZYGOTE_START_TIMEOUT = 10.0         # s to preload and say "ready": heavy imports on a busy host
                                    # take seconds; more is a hang (a connect with no timeout)
ZYGOTE_REPLY_TIMEOUT = 3.0          # s to answer a fork request or a ping: a fork takes a
                                    # millisecond, so more means it is stopped or stuck
ZYGOTE_CHECK_INTERVAL = 0.5         # s between checks of those deadlines (and pings while its
                                    # attempts run: their exits come only through it)
ZYGOTE_MSG_TRUNC = int(socket.MSG_TRUNC)    # a plain int: `flags & socket.MSG_TRUNC` runs the
                                            # IntFlag's Python __and__, per message

# The fork server's own code (runs in the zygote process, never in the daemon; a string for the
# same reason as CHILD_SOURCE: the zygote is a bare `python -I` that must not import jobrunnerd,
# or every job process forked from it would hold the daemon's module). It reads its
# config (`_conf`), preloads, says {"ready": true}, then takes one message per attempt: {"token",
# "job", "attempt", "title"} with two fds (the output pipe and the channel), {"token", "worker": 1,
# "once"} with one fd (a reused worker's socket: WORKER_SOURCE; "once": a fresh queue's spare,
# for one attempt), or {"ping": n}. It answers
# {"started": token, "pid", "start"} after each fork, {"pong": n}, {"exit": pid, "status"} for
# each attempt process it reaps (not for the orphans it adopts as subreaper: see Containment),
# and exits once the daemon closed the socket and no child is left.
ZYGOTE_SOURCE = (("MAX_WARNING = %d\n" % ZYGOTE_MAX_WARNING) + r'''
import _signal, json, os, select, signal, socket, sys
import ctypes, fnmatch, importlib, resource, traceback     # what every job process imports

def _tell(msg):
    try:
        _ctl.send(json.dumps(msg).encode())
    except OSError:
        pass

def _start_time(pid):
    try:
        fd = os.open("/proc/%d/stat" % pid, os.O_RDONLY)     # no file object: on the job's
        try:                                                # way to its start
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None

_argv_room = None       # (address, size) of the blank last argument the daemon gave us
_argv_area = None       # (arg_start, arg_end): our whole argv, when that room was found

def _find_argv_room():
    """Where that blank argument lies in our memory (arg_end in /proc/self/stat): a child
    writes its attempt's mark there, and ps and /proc/PID/cmdline show it for the child and
    for every process it forks without exec (the daemon's Containment reads it)."""
    global _argv_room, _argv_area
    try:
        fd = os.open("/proc/self/stat", os.O_RDONLY)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        fields = data[data.rindex(b")") + 2:].split()
        arg_start, arg_end = int(fields[45]), int(fields[46])
        size = len(sys.argv[-1])
        if size and sys.argv[-1] == " " * size and \
                ctypes.string_at(arg_end - size - 1, size + 1) == b" " * size + b"\0":
            _argv_room = (arg_end - size - 1, size)
            _argv_area = (arg_start, arg_end)
    except (OSError, ValueError, IndexError):
        pass

def _mark_argv(req, job, prctl):
    """The attempt's mark "jobrunner-job ID N" in our argv, after its title when the request
    has one: the name in ps that the job process's _retitle() gives itself, written here in
    the same write (no /proc read and second write per child), with /proc/self/comm."""
    if _argv_room is None:
        return
    title, mark = req.get("title"), "jobrunner-job\0%d\0%d\0" % (req["job"], req["attempt"])
    if type(title) is str and _argv_area[1] - _argv_area[0] - len(mark) - 1 >= 16:
        job["_write_argv"](_argv_area, title, mark.encode())
        comm = job["_comm"](title)
        if prctl is not None and comm is not None:
            try:
                prctl(15, comm.encode(), 0, 0, 0)
            except Exception:
                pass
        return
    at, size = _argv_room
    if len(mark) - 1 <= size:
        ctypes.memmove(at, mark[:-1].encode().ljust(size, b"\0"), size)

def _child(req, fds, job, wake, prctl):
    """A fresh attempt's process: set up as SPEC section 2 says, then the job process's code
    (CHILD_SOURCE, its functions defined once in the zygote: `job`) runs the attempt."""
    status = 1
    try:
        _mark_argv(req, job, prctl)     # first: until then the daemon cannot tell it is ours
        signal.set_wakeup_fd(-1)
        _signal.signal(signal.SIGCHLD, _signal.SIG_DFL)   # (signal.signal()'s enum round trip
        for s in wake:                                      # on the zygote's handler cost a
            s.close()                                       # child ~0.09 ms)
        _ctl.close()
        os.setpgid(0, 0)
        out_w, chan = fds
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.dup2(chan, 3)
        for fd in {null, out_w, chan} - {0, 1, 2, 3}:
            os.close(fd)
        os.environ["JOBRUNNER_JOB_ID"] = str(req["job"])     # the rest is the zygote's: env
        os.environ["JOBRUNNER_ATTEMPT"] = str(req["attempt"])
        job["_start"]()
        status = 0
    except SystemExit as exc:
        status = job["_exit_status"](exc)
    except BaseException:
        traceback.print_exc()
    finally:
        job["_exit"](status)

def _worker(fds, code, wake, prctl, zygote):
    """A reused worker (SPEC 2d): set up as an attempt's child is, then `code` (CHILD_SOURCE's
    functions and WORKER_SOURCE) runs attempts one after another over the socket in fds[0]
    until the daemon closes it. Its argv carries no attempt mark until its first attempt.
    `code` a dict: a spare of a fresh queue, forked ahead, that runs one attempt and exits;
    the dict holds those functions, defined once in the zygote (not in each spare)."""
    try:
        signal.set_wakeup_fd(-1)
        _signal.signal(signal.SIGCHLD, _signal.SIG_DFL)
        for s in wake:
            s.close()
        _ctl.close()
        os.setpgid(0, 0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if null > 2:
            os.close(null)
        os.set_inheritable(fds[0], False)       # no job's exec'd child holds our socket
        if type(code) is dict:
            code["_ctl"] = socket.socket(fileno=fds[0])
            code["_serve"]()
        else:
            exec(code, {"__name__": "jobrunner-worker", "__builtins__": __builtins__,
                        "_ctl": socket.socket(fileno=fds[0]), "_prctl": prctl,
                        "_zygote_pid": zygote, "_once": False})
    except BaseException:
        traceback.print_exc()
    os._exit(1)

def _zygote():
    global _ctl
    fd = _ctl.detach()                          # keep fd 3 free for the children's channel
    _ctl = socket.socket(fileno=os.dup(fd))
    os.close(fd)
    prctl = None
    try:                                        # die with the daemon
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(1, signal.SIGKILL)
        prctl(36, 1)    # PR_SET_CHILD_SUBREAPER: what leaves an attempt's group comes to us
    except Exception:
        pass
    _find_argv_room()
    conf = _conf
    if os.getppid() != conf["parent"]:
        os._exit(1)
    sys.path[:0] = conf["paths"]
    for name in conf["preload"]:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            _tell({"warning": ("preload %s failed: %s: %s"
                               % (name, type(exc).__name__, exc))[:MAX_WARNING]})
    worker_code = compile(conf["child"] + conf["worker"], "<jobrunner-worker>", "exec")
    # The job process's functions, defined here once: a fresh child calls _start(), a spare
    # _serve() (defining them in each child cost it ~0.1 ms, and copies of the pages that
    # touches). Named "<jobrunner-job>" in a traceback, as an attempt's process is.
    job = {"__name__": "jobrunner-job", "__builtins__": __builtins__, "_prctl": prctl,
           "_zygote_pid": os.getpid(), "_once": True}
    exec(compile(conf["child"] + conf["worker"], "<jobrunner-job>", "exec"), job)
    job["_chan"] = job["_SpecLine"]()
    if dict(os.environ) != conf["env"]:         # a preloaded module changed it: undo, once,
        os.environ.clear()                      # here rather than in every child
        os.environ.update(conf["env"])
    for pattern in conf["allow"]:               # compiled once here, not in every child
        fnmatch.fnmatchcase("", pattern)
    import gc
    # What the imports left for the collector goes now, and the C heap's free pages back to
    # the kernel: each fork copies the page-table entries of every page we hold, and each
    # child's exit tears them down again.
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except Exception:
        pass
    gc.freeze()         # children's collections skip what we hold: no copy-on-write of it all
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *a: None)
    children = set()
    listening = True
    # The loop below runs once per fork and once per exit: every page it writes after a fork
    # is copied while the children share it, so it stays small (no json.dumps per reply, no
    # list built per select, recvmsg without socket.recv_fds()'s wrapper).
    both, wake_only = [wake_r, _ctl], [wake_r]
    recvmsg, send, room = _ctl.recvmsg, _ctl.send, socket.CMSG_SPACE(4 * 4)
    _tell({"ready": True})
    while listening or children:
        ready = select.select(both if listening else wake_only, [], [])[0]
        if ready[0] is wake_r:
            try:
                wake_r.recv(4096)
            except BlockingIOError:
                pass
            while True:                 # our attempts, and the orphans adopted as subreaper
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    children.clear()
                    break
                if pid == 0:
                    break
                if pid in children:             # an adopted orphan is none of the daemon's
                    children.discard(pid)       # business: it sweeps again after each kill
                    try:
                        send(b'{"exit": %d, "status": %d}' % (pid, status))
                    except OSError:
                        pass
        if listening and ready[-1] is _ctl:
            try:
                msg, anc, _, _ = recvmsg(65536, room)
            except OSError:             # reset: the daemon closed it with our exits unread
                msg, anc = b"", []      # (not the last request's fds: they are closed)
            fds = []
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += [int.from_bytes(data[i:i + 4], sys.byteorder, signed=True)
                            for i in range(0, len(data) - 3, 4)]
            if not msg:
                for fd in fds:
                    os.close(fd)
                listening = False
                continue
            req = json.loads(msg)
            wanted = 0 if "ping" in req else 1 if "worker" in req else 2
            if len(fds) != wanted:          # (never from the daemon) none is kept or inherited
                for fd in fds:
                    os.close(fd)
                fds = []
                if wanted:
                    _tell({"started": req["token"],
                           "error": "the fork request carried a wrong number of fds"})
                    continue
            if "ping" in req:
                _tell({"pong": req["ping"]})
                continue
            try:
                pid = os.fork()
            except OSError as exc:
                pid = None
                _tell({"started": req["token"], "error": str(exc)})
            if pid == 0 and "worker" in req:
                _worker(fds, job if req.get("once") else worker_code, (wake_r, wake_w),
                        prctl, os.getppid())
            if pid == 0:
                _child(req, fds, job, (wake_r, wake_w), prctl)
            for fd in fds:
                os.close(fd)
            if pid:
                children.add(pid)
                start = _start_time(pid)
                try:
                    send(b'{"started": %d, "pid": %d, "start": %s}'
                         % (req["token"], pid, b"null" if start is None else b"%d" % start))
                except OSError:
                    pass

_zygote()
''')


# A reused worker's own code (SPEC §2d), run after CHILD_SOURCE's functions in a process the
# zygote forked (_worker): it takes {"job", "attempt", "title"} with two fds (the attempt's
# output pipe and channel) on its socket, runs the attempt as a fresh child would
# (CHILD_SOURCE's _main: the same checks, report and exits), and after one that returned:
# kills and reaps what the attempt left (every such process is its descendant: it is their
# subreaper), puts back the environment, cwd, umask and sys.path, lets go of the output pipe,
# and says {"done": N}. It exits instead where the attempt left what it cannot undo (a thread,
# an atexit function, a signal handler, a replaced sys.stdout, a move to another process
# group, a process that survives SIGKILL): the daemon takes the "ok" report and exit 0 as the
# attempt's success and starts another worker. A failed attempt exits as a fresh child does.
# Limits: memory, nofile and fsize hold for the worker as a whole (what earlier attempts
# imported counts); cpu is the attempt's: the soft limit is the worker's CPU time so far plus
# `cpu`, before each attempt. A spare of a fresh queue (_once) takes one attempt the same way
# and exits when it ends (as a fresh child: limits and leftovers too).
WORKER_LEFTOVER_WAIT = 2.0          # s a SIGKILLed leftover may take to go before the worker quits
WORKER_SOURCE = ("LEFTOVER_WAIT = %r\n" % WORKER_LEFTOVER_WAIT) + r'''
import atexit, ctypes, resource, socket, time

def _label(title, mark, comm):
    """What ps shows: our argv becomes `title` then the mark "jobrunner-job ID N" (by which the
    daemon's Containment and start-up find an attempt's processes; none while idle)."""
    try:
        if comm:
            _prctl(15, comm.encode()[:15], 0, 0, 0)     # PR_SET_NAME
    except Exception:
        pass
    try:
        _write_argv(_AREA, title, mark.encode())
    except Exception:
        pass

def _children():
    """Our children, of every thread (a job's thread may have forked)."""
    found = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open("/proc/self/task/%s/children" % tid, "rb") as f:
                found += [int(p) for p in f.read().split()]
    except FileNotFoundError:                       # a kernel without CONFIG_PROC_CHILDREN
        me = os.getpid()
        for name in os.listdir("/proc"):
            try:
                with open("/proc/%s/stat" % name, "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == me:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return found

def _kill_leftovers():
    """SIGKILL what the attempt left, with the groups of those that left ours, and reap them;
    their own children come to us as they die, and go the same way. False if some are still
    there after LEFTOVER_WAIT (uninterruptible sleep)."""
    me, deadline = os.getpid(), time.monotonic() + LEFTOVER_WAIT
    while True:
        kids = _children()
        if not kids:
            return True
        for pid in kids:                # unreaped: no pid of these can be recycled meanwhile
            try:
                group = os.getpgid(pid)
                os.kill(pid, signal.SIGKILL)
                if group == pid:        # a group of its own (setsid): its members too; a
                    os.killpg(group, signal.SIGKILL)    # group it joined may be another's
            except OSError:
                pass
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        if time.monotonic() >= deadline:
            return not _children()
        time.sleep(0.001)

def _set_limits(limits):
    for name, value in limits.items():
        which = getattr(resource, _LIMITS[name])
        soft, hard = resource.getrlimit(which)
        if name == "cpu" and not _once:     # this attempt's CPU seconds, on top of the worker's
            used = resource.getrusage(resource.RUSAGE_SELF)
            value += int(used.ru_utime + used.ru_stime) + 1
            wanted = (value if hard == resource.RLIM_INFINITY else min(value, hard), hard)
        else:
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            wanted = (value, value)
        if (soft, hard) != wanted:
            resource.setrlimit(which, wanted)

_ITIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)
_RLIMITS = tuple(getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_"))

def _process_state():
    """What an attempt may change in the process itself that a later attempt would inherit
    and we cannot put back: blocked signals, the nice value (only raised without privilege),
    resource limits, CPU affinity, ids, the interpreter's recursion limit and hooks."""
    return (signal.pthread_sigmask(signal.SIG_BLOCK, ()), os.getpriority(os.PRIO_PROCESS, 0),
            [resource.getrlimit(r) for r in _RLIMITS], os.sched_getaffinity(0), os.getresuid(),
            os.getresgid(), os.getgroups(), sys.getrecursionlimit(), sys.gettrace(),
            sys.getprofile())

def _attempt(req, out_w, chan):
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    if chan != 3:
        os.dup2(chan, 3)
    os.set_inheritable(3, False)      # the job's own children must not hold the channel
    for fd in {out_w, chan} - {0, 1, 2, 3}:
        os.close(fd)
    os.environ["JOBRUNNER_JOB_ID"] = str(req["job"])
    os.environ["JOBRUNNER_ATTEMPT"] = str(req["attempt"])
    title = req.get("title")            # its name in ps and top comes with the attempt
    if type(title) is not str:
        title = "jobrunner: job %d attempt %d" % (req["job"], req["attempt"])
    _label(title, "jobrunner-job\0%d\0%d\0" % (req["job"], req["attempt"]),
           _comm(title) or "job %d %d" % (req["job"], req["attempt"]))
    line = _SpecLine().readline()
    if not line:                        # the daemon stopped the attempt before it ran
        os._exit(1)
    spec = json.loads(line)
    _set_limits(spec["limits"])
    state = _process_state()
    status = None
    try:
        _main(spec)
        if _once:                       # a spare: the attempt's end is the process's end
            status = 0
    except SystemExit as exc:           # as a fresh child's (zygote _child) exit
        status = _exit_status(exc)
    except BaseException:
        import traceback
        traceback.print_exc()
        status = 1
    if status is not None:
        _exit(status)
    # It returned: its report is sent. Undo what it changed, or go. First its timers (an
    # alarm it set must not end a later attempt): a worker that had one armed goes.
    armed = [signal.setitimer(t, 0) for t in _ITIMERS] != [(0.0, 0.0)] * len(_ITIMERS)
    reusable = atexit._ncallbacks() == _ATEXIT and not armed and _process_state() == state
    if not reusable:
        atexit._run_exitfuncs()         # into this attempt's output, as at a fresh exit
    threading = sys.modules.get("threading")
    reusable = reusable and (threading is None or threading.active_count() == 1) \
        and sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__ \
        and not sys.stdout.closed and not sys.stderr.closed and os.getpgrp() == os.getpid() \
        and all(signal.getsignal(s) == h for s, h in _SIGNALS.items())
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        reusable = False
    reusable = _kill_leftovers() and reusable
    if not reusable:
        os._exit(0)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)                    # the output pipe's last writer goes: the daemon sees
    os.dup2(null, 2)                    # its end (after all the attempt wrote)
    os.close(null)
    for name in ("JOBRUNNER_JOB_ID", "JOBRUNNER_ATTEMPT"):
        if name in _ENV:
            os.environ[name] = _ENV[name]
        else:
            os.environ.pop(name, None)
    if os.environ != _ENV:
        os.environ.clear()
        os.environ.update(_ENV)
    if sys.path != _PATH:
        sys.path[:] = _PATH
    os.umask(_UMASK)
    try:
        os.chdir(_CWD)
    except OSError:
        os._exit(0)

def _serve():
    global _AREA, _ENV, _PATH, _UMASK, _CWD, _ATEXIT, _SIGNALS
    try:
        _prctl(1, signal.SIGKILL)       # PR_SET_PDEATHSIG: dies with its zygote, as it does
        if not _once:                   # with the daemon; PR_SET_CHILD_SUBREAPER: what its
            _prctl(36, 1)               # attempts leave comes back to it, not to the zygote
    except Exception:                   # (a spare's leftovers go to the zygote, as a fresh
        pass                            # child's do: it cleans up nothing itself)
    if os.getppid() != _zygote_pid:
        os._exit(1)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.stdout.reconfigure(line_buffering=True)
    _AREA = _argv_area()
    if _once:
        _label("jobrunner: spare, ready for one attempt", "", "jobrunner-spare")
        try:
            msg, fds, _, _ = socket.recv_fds(_ctl, 4096, 2)
        except OSError:
            os._exit(0)
        _ctl.close()                    # the job must not reach the daemon through it
        if not msg:                     # retired before it ran any
            os._exit(0)
        if len(fds) != 2:
            os._exit(1)
        _attempt(json.loads(msg), *fds)
        os._exit(1)                     # (_attempt exits: not reached)
    _ENV, _PATH, _CWD = dict(os.environ), list(sys.path), os.getcwd()
    _UMASK = os.umask(0o22)
    os.umask(_UMASK)
    _ATEXIT = atexit._ncallbacks()
    _SIGNALS = {s: signal.getsignal(s) for s in signal.valid_signals()
                if s not in (signal.SIGKILL, signal.SIGSTOP)}
    done = 0
    while True:
        _label("jobrunner: worker idle, %d attempts done" % done, "", "jobrunner-wkr")
        try:
            msg, fds, _, _ = socket.recv_fds(_ctl, 4096, 2)
        except OSError:
            os._exit(0)
        if not msg:                     # the daemon closed our socket: retire
            os._exit(0)
        if len(fds) != 2:
            os._exit(1)
        _attempt(json.loads(msg), *fds)
        done += 1
        try:
            _ctl.send(json.dumps({"done": done}).encode())
        except OSError:
            os._exit(0)

if __name__ == "jobrunner-worker":
    _serve()
'''


MAX_TITLE = 1000    # chars of an attempt's process title: more than any argv area it fills


def attempt_title(job: Job, number: int) -> str:
    """An attempt's process's name in ps: "jobrunner: job 42 attempt 1/3 pkg.mod:Attr"."""
    return ("jobrunner: job %d attempt %d/%d %s" % (job.id, number, job.retries + 1,
                                                    job.target))[:MAX_TITLE]


class Zygote:
    """The fork server: one small interpreter, started once (`python -I`), that has imported
    only what job processes need plus `preload`, and forks each attempt on request (~1 ms
    instead of a new interpreter's tens of ms). It dies with the daemon (PR_SET_PDEATHSIG) and
    its children die with it. SIGHUP retires it: it takes no new work, and exits once the
    attempts it forked are over, so a new one picks up changed job code.

    It is never waited for without a deadline: it must say "ready" within ZYGOTE_START_TIMEOUT
    and answer each request (and, while its attempts run, a ping) within ZYGOTE_REPLY_TIMEOUT;
    one that misses a deadline or sends what it should not is broken(): killed, and the Runner
    spawns attempts until a new one is ready."""

    def __init__(self, runner: "Runner"):
        self.runner = runner
        self.attempts: set[Attempt] = set()
        self.pending: dict[int, Attempt] = {}   # token -> attempt whose pid is not known yet
        self.asked: dict[int, float] = {}       # token -> when its fork request was made
        self.outbox: list[tuple] = []           # fork requests the socket could not take yet
        self.retiring = False
        self.dead = False
        self.ready = False                      # preloaded: it said so
        self.first_birth: int | None = None     # of its first attempt (Containment)
        self.ready_at = 0.0
        self.ping_at: float | None = None       # when the unanswered ping went out
        self.pings = 0
        self.checking = None                    # the timer of check(), while one is due
        self.watching_write: bool | None = None
        self.start_deadline = time.monotonic() + runner.start_timeout
        self.pid, self.ctl = self.spawn(runner.cfg, runner.env)
        self.ctl.setblocking(False)
        self._watch()
        self._check_soon()

    @staticmethod
    def spawn(cfg: "Config", env: dict, file_actions=()) -> tuple[int, socket.socket]:
        """Start a zygote process for `cfg` with environment `env`: (its pid, our end of its
        socket). `file_actions`: more of posix_spawn's (a test gives it a stderr)."""
        conf = json.dumps({"source": ZYGOTE_SOURCE, "parent": os.getpid(),
                           "paths": cfg.job_paths, "preload": cfg.preload, "child": CHILD_SOURCE,
                           "worker": WORKER_SOURCE,
                           "allow": cfg.allow, "env": env}).encode()
        boot = _fd_above(os.memfd_create("jobrunner-zygote", os.MFD_CLOEXEC), 4)
        try:
            _write_all(boot, conf)
            os.lseek(boot, 0, os.SEEK_SET)
            ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                # Neither may be fd 3 or 4 itself: the first dup2 would overwrite the other.
                theirs_fd = _fd_above(os.dup(theirs.fileno()), 4)
                try:
                    pid = os.posix_spawn(sys.executable, [
                        sys.executable, "-I", "-c", ZYGOTE_BOOTSTRAP, "jobrunner-zygote",
                        " " * (ATTEMPT_ARGV_ROOM - 1)], env,          # room for _mark_argv()
                        file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                      (os.POSIX_SPAWN_DUP2, theirs_fd, 3),
                                      (os.POSIX_SPAWN_DUP2, boot, 4), *file_actions],
                        setpgroup=0, setsigdef=(signal.SIGCHLD,))
                finally:
                    os.close(theirs_fd)
            except BaseException:
                ctl.close()
                raise
            finally:
                theirs.close()
        finally:
            os.close(boot)
        return pid, ctl

    def _watch(self) -> None:
        """Watch the socket for replies, and for room to write while requests wait."""
        if self.watching_write is not bool(self.outbox):     # a syscall only on a change
            self.watching_write = bool(self.outbox)
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0)
            self.runner.loop.watch(self.ctl.fileno(), events, "internal", self._on_ctl)

    def fork(self, att: Attempt, out_w: int, chan_child: socket.socket) -> None:
        """Ask for a child for `att`; its pid comes back later (Runner.started). The child
        takes its name in ps from the request (written with its mark), not from the spec."""
        msg = json.dumps({"token": att.token, "job": att.job.id, "attempt": att.number,
                          "title": attempt_title(att.job, att.number)}).encode()
        out_copy = os.dup(out_w)
        try:
            chan_copy = os.dup(chan_child.fileno())
        except OSError:
            os.close(out_copy)
            raise
        self.outbox.append((msg, out_copy, chan_copy))
        self.pending[att.token] = att
        self.asked[att.token] = time.monotonic()
        self.attempts.add(att)
        att.zygote = self
        self._flush()
        self._check_soon()

    def fork_worker(self, worker: "Worker", sock: socket.socket) -> None:
        """Ask for a reused worker (SPEC §2d), or a spare (worker.once), on `sock`; its pid
        comes back later (Runner.worker_started), as an attempt's does."""
        msg = json.dumps({"token": worker.token, "worker": 1, "once": worker.once}).encode()
        self.outbox.append((msg, os.dup(sock.fileno())))
        self.pending[worker.token] = worker
        self.asked[worker.token] = time.monotonic()
        self._flush()
        self._check_soon()

    def withdraw(self, att: Attempt) -> None:
        """Forget the fork request of `att` (stopped before its pid came): a child still made
        for it is killed when its pid comes."""
        self.pending.pop(att.token, None)
        self.asked.pop(att.token, None)
        self.attempts.discard(att)

    def _flush(self) -> None:
        while self.outbox:
            msg, *fds = self.outbox[0]
            try:
                socket.send_fds(self.ctl, [msg], fds)
            except BlockingIOError:
                break
            except OSError:         # gone; said in the next pass, not inside Runner.start()
                self.runner.loop.call_later(0, self.died)
                return
            self.outbox.pop(0)
            for fd in fds:
                os.close(fd)
        self._watch()

    # -- deadlines ---------------------------------------------------------------------------

    def _check_soon(self) -> None:
        if self.checking is None and not self.dead:
            self.checking = self.runner.loop.call_later(ZYGOTE_CHECK_INTERVAL, self.check)

    def check(self) -> None:
        """Hold the zygote to its deadlines; ping it while its attempts run (a stopped zygote
        reports no exit: their jobs would look alive for ever)."""
        self.checking = None
        if self.dead:
            return
        now = time.monotonic()
        if not self.ready:
            if now >= self.start_deadline:
                return self.broken("was not ready (preloaded) within %gs"
                                   % self.runner.start_timeout)
        elif self.asked and now - max(min(self.asked.values()), self.ready_at) \
                >= ZYGOTE_REPLY_TIMEOUT:
            return self.broken("did not answer a fork request within %gs"
                               % ZYGOTE_REPLY_TIMEOUT)
        elif self.ping_at is not None and now - self.ping_at >= ZYGOTE_REPLY_TIMEOUT:
            return self.broken("did not answer a ping within %gs" % ZYGOTE_REPLY_TIMEOUT)
        elif self.ping_at is None and self.attempts and not self.outbox:
            self.pings += 1
            try:
                self.ctl.send(json.dumps({"ping": self.pings}).encode())
                self.ping_at = now
            except BlockingIOError:
                pass                # full of requests: those have their own deadline
            except OSError:
                return self.died()
        if not self.ready or self.asked or self.attempts or self.ping_at is not None:
            self._check_soon()

    def broken(self, reason: str) -> None:
        """It stopped answering, or sent nonsense: kill it. A new one replaces it; until that
        one is ready, attempts are spawned."""
        if self.dead:
            return
        warn("the zygote (pid %d) %s: killed; jobs start by spawn until a new one is ready"
             % (self.pid, reason))
        self.runner.zygote_lost(count=True)
        # A stopped zygote holds its children's exits unreported: take those that ended from
        # /proc while it still keeps them, before it goes and they are reaped by others.
        for att in list(self.attempts):
            if att.pid is not None:
                self.runner.settle(att)
        self.retiring = True        # its death is ours: reap() must not count it again
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.died("stopped answering")

    # -- replies -----------------------------------------------------------------------------

    def _on_ctl(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        while not self.dead:
            try:
                data, _, flags, _ = self.ctl.recvmsg(ZYGOTE_MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data, flags = b"", 0
            if not data:
                self.died()
                return
            msg = self._parse(data, flags)
            if msg is None:
                return self.broken("sent a message that is not what it may send")
            if "started" in msg:
                att = self.pending.pop(msg["started"], None)
                self.asked.pop(msg["started"], None)
                if isinstance(att, Worker):
                    if msg.get("pid"):
                        self.runner.worker_started(att, msg["pid"], msg.get("start"))
                    else:
                        self.runner.worker_start_failed(att, "the zygote could not fork: %s"
                                                        % msg.get("error"))
                    self.release()              # (retired meanwhile: it may go now)
                    continue
                if att is None:                 # withdrawn meanwhile: its child must not run
                    if msg.get("pid"):
                        kill_group(msg["pid"], signal.SIGKILL)
                        try:
                            os.kill(msg["pid"], signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    continue
                if msg.get("pid"):
                    self.runner.started(att, msg["pid"], msg.get("start"))
                else:
                    self.attempts.discard(att)
                    self.runner.start_failed(att, "the zygote could not fork: %s"
                                             % msg.get("error"))
            elif "exit" in msg:
                self.runner.exited(msg["exit"], msg["status"])
            elif "pong" in msg:
                self.ping_at = None
            elif "ready" in msg:
                self.ready, self.ready_at = True, time.monotonic()
                self.runner.zygote_ready(self)
            elif "warning" in msg:
                warn("zygote: %s" % msg["warning"][:ZYGOTE_MAX_WARNING])

    @staticmethod
    def _parse(data: bytes, flags: int) -> dict | None:
        """One message from the zygote, or None if it is not one it may send (cut short, not
        JSON, fields of the wrong type): the daemon never raises on what a zygote sends."""
        if flags & ZYGOTE_MSG_TRUNC:
            return None
        try:
            msg = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(msg, dict):
            return None
        ints = lambda *names: all(type(msg.get(n)) is int for n in names)
        optional = lambda name, kind: msg.get(name) is None or type(msg[name]) is kind
        if "started" in msg:
            good = ints("started") and optional("pid", int) and optional("start", int) \
                and (msg.get("pid") or 0) >= 0
        elif "exit" in msg:
            good = ints("exit", "status") and msg["exit"] > 0
        elif "warning" in msg:
            good = type(msg["warning"]) is str
        else:
            good = "pong" in msg or "ready" in msg
        return msg if good else None

    def retire(self) -> None:
        """Take no new work; go away once the attempts it forked are over."""
        self.retiring = True
        self.release()

    def release(self) -> None:
        if self.retiring and not self.attempts and not self.pending and not self.dead:
            self.runner.loop.unwatch(self.ctl.fileno())
            self.ctl.close()
            self.dead = True

    def died(self, how: str = "died") -> None:
        """The zygote is gone (crashed or killed): its children died with it (PDEATHSIG).
        Attempts it had not forked yet were no attempts: they go back to the daemon as a
        start that failed for a reason of the host."""
        if self.dead and not self.attempts:
            return
        if not self.retiring:
            self.runner.zygote_lost(count=False)    # reap() counts it
        self.dead = True
        Loop.cancel(self.checking)
        self.checking = None
        self.runner.loop.unwatch(self.ctl.fileno())
        self.ctl.close()
        for msg, *fds in self.outbox:
            for fd in fds:
                os.close(fd)
        self.outbox.clear()
        for att in list(self.pending.values()):
            if isinstance(att, Worker):
                self.runner.worker_start_failed(att, "the zygote %s before the job started"
                                                % how, retry_now=True)
                continue
            self.attempts.discard(att)
            self.runner.start_failed(att, "the zygote %s before the job started" % how,
                                     retry_now=True)
        self.pending.clear()
        self.asked.clear()
        for att in list(self.attempts):
            if not self.runner.settle(att):
                kill_group(att.pid, signal.SIGKILL)
                self.runner.exited(att.pid, signal.SIGKILL)     # a wait status: killed by SIGKILL
        self.attempts.clear()
        self.runner.workers_lost(self)


class Worker:
    """A reused worker of a queue whose isolation is "reuse" (SPEC §2d), as the Runner sees
    it: a process its zygote forked (its pid known once the zygote says so), in its own
    process group; a SEQPACKET socket that hands it one attempt at a time ({"job", "attempt"}
    with the attempt's output pipe and channel) and brings back {"done": N} after each attempt
    that returned; and the attempt it runs, if any. Its exit, like an attempt's, comes from
    its zygote (Runner.exited). The Runner is its one user.

    `once`: a spare of a fresh queue instead (SPEC §2: a fork of the clean zygote), forked
    ahead of its attempt so that at dispatch its pid is known at once and its fork is paid
    while the slot's previous attempt runs; it takes one attempt as a reused worker does,
    never says "done", and exits when the attempt ends, as a fresh child does."""

    __slots__ = ("queue", "token", "zygote", "ctl", "pid", "pid_start", "attempt", "handoff",
                 "done", "retiring", "once")

    def __init__(self, queue: Queue, token: int, zygote: Zygote, once: bool = False):
        self.queue = queue
        self.token = token
        self.zygote = zygote
        self.once = once
        self.pid: int | None = None
        self.pid_start: int | None = None
        self.attempt: Attempt | None = None
        self.handoff: tuple[int, int] | None = None     # the attempt's fds until the pid comes
        self.done = 0                                   # attempts it ran to their report
        self.retiring = False                           # SIGHUP: goes after its attempt
        ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ctl.setblocking(False)
            zygote.fork_worker(self, theirs)
        except BaseException:
            ctl.close()
            raise
        finally:
            theirs.close()
        self.ctl: socket.socket | None = ctl

    def hand(self, att: Attempt, out_w: int, chan_fd: int) -> None:
        """Give it `att` (OSError if it cannot take it: it is gone)."""
        msg = json.dumps({"job": att.job.id, "attempt": att.number,
                          "title": attempt_title(att.job, att.number)}).encode()
        socket.send_fds(self.ctl, [msg], [out_w, chan_fd])

    def drop_handoff(self) -> None:
        if self.handoff is not None:
            for fd in self.handoff:
                os.close(fd)
            self.handoff = None

    @staticmethod
    def parse(data: bytes, flags: int) -> int | None:
        """{"done": N} -> N; None for anything else (a job can write to the socket it
        inherited: the daemon never raises on it)."""
        if flags & socket.MSG_TRUNC:
            return None
        try:
            msg = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if type(msg) is dict and msg.keys() == {"done"} and type(msg["done"]) is int:
            return msg["done"]
        return None


class Runner:
    """Starts attempts as fresh child processes and watches them.

    For callers: start(job, number) -> Attempt, release(attempt) once its pid is on record (the
    process waits for that before it runs the job), stop(attempt, reason), reap() after SIGCHLD,
    restart() on SIGHUP, close() at exit, and `active` (token -> Attempt, starting or running).
    It reports through three callbacks: on_started(att) once the pid is known, on_exit(att)
    once the process has exited and its pipes are drained, on_start_failed(att, error) when no
    process could be made. Deciding what that means for the job is the daemon's business.

    start_method "spawn" runs `sys.executable -I` per attempt; "zygote" forks each attempt from
    the Zygote. Either way the child gets fd 0 = /dev/null, fds 1 and 2 = a pipe whose other end
    the runner copies to the output file (capped at max_output_bytes), fd 3 = a socket carrying
    the job spec in and the result out, its own process group, and the daemon's environment
    minus systemd's variables plus JOBRUNNER_JOB_ID / JOBRUNNER_ATTEMPT."""

    ZYGOTE_QUICK_DEATHS = 3         # zygotes dying this often within a minute: fall back to spawn

    def __init__(self, cfg: "Config", loop: Loop, on_started, on_exit, on_start_failed):
        self.cfg = cfg
        self.loop = loop
        self.on_started, self.on_exit, self.on_start_failed = on_started, on_exit, on_start_failed
        self.active: dict[int, Attempt] = {}
        self.by_pid: dict[int, Attempt] = {}
        self.tokens = 0
        self.zygote: Zygote | None = None
        self.zygotes: list[Zygote] = []         # every zygote not yet reaped
        self.quick_deaths: list[float] = []
        self.spawn_until_ready = False          # a zygote failed: spawn until a new one is ready
        self.start_timeout = ZYGOTE_START_TIMEOUT
        self.output_dir = os.path.join(cfg.log_dir, "output")
        self.out_dir_fd: int | None = None      # output/, opened once (output_dir_fd)
        self.output_trouble = WriteTrouble()    # bytes of job output lost
        self.env = {k: v for k, v in os.environ.items()
                    if k != "NOTIFY_SOCKET" and not k.startswith(("LISTEN_", "WATCHDOG_"))}
        self.source_line = (json.dumps(CHILD_SOURCE) + "\n").encode()
        self.containment = Containment(self)
        self.workers: set[Worker] = set()              # reused workers (SPEC §2d), all states
        self.worker_pids: dict[int, Worker] = {}       # those whose pid is known
        self.idle: dict[str, list[Worker]] = {}        # queue name -> its idle workers
        self.spares: dict[str, list[Worker]] = {}      # queue name -> its idle spares (pid known)
        self.cpus = _cpu_count()                       # (spares are forked while one is free)

    def output_path(self, job_id: int) -> str:
        return os.path.join(self.output_dir, "%d.log" % job_id)

    def output_dir_fd(self) -> int:
        """output/, held open from the first use (start-up): its files are opened relative to
        it, never through a link put in the place of output/ or of a file in it (SPEC §3a)."""
        if self.out_dir_fd is None:
            self.out_dir_fd = open_nofollow(self.output_dir, os.O_RDONLY | os.O_DIRECTORY)
        return self.out_dir_fd

    def open_output(self, job_id: int, flags: int) -> int:
        """Open output/ID.log (OSError if it is a symbolic link or cannot be opened)."""
        try:
            return open_nofollow("%d.log" % job_id, flags, 0o640, dir_fd=self.output_dir_fd())
        except OSError as exc:          # name the whole path, not the one relative to output/
            raise OSError(exc.errno, exc.strerror, self.output_path(job_id)) from None

    # -- start -------------------------------------------------------------------------------

    def use_zygote(self) -> bool:
        if self.cfg.start_method != "zygote":
            return False
        now = time.monotonic()
        self.quick_deaths = [t for t in self.quick_deaths if now - t < 60.0]
        return len(self.quick_deaths) < self.ZYGOTE_QUICK_DEATHS

    def prepare(self) -> None:
        """Start the zygote early, so that it is warm when the first job comes."""
        if self.use_zygote() and (self.zygote is None or self.zygote.dead):
            try:
                self.zygote = Zygote(self)
            except OSError:
                self.quick_deaths.append(time.monotonic())  # counts toward falling back to spawn
                raise
            self.zygotes.append(self.zygote)

    def zygote_lost(self, count: bool) -> None:
        """A zygote died or was killed for not answering: spawn until a new one is ready."""
        self.spawn_until_ready = True
        if count:
            self.quick_deaths.append(time.monotonic())

    def zygote_ready(self, zygote: "Zygote") -> None:
        if zygote is self.zygote:
            self.spawn_until_ready = False

    def start(self, job: Job, number: int, queue: Queue | None = None) -> Attempt:
        """Start attempt `number` of `job` (in `queue`: a reuse queue runs it in a worker).
        Raises OSError if no process could be started now; with a zygote, the pid (or a
        failure) is reported later through the callbacks."""
        self.tokens += 1
        att = Attempt(job, number, self.tokens)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            chan, chan_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:                 # no fd free: none may leak, or none ever frees up
            os.close(out_r)
            os.close(out_w)
            raise
        try:
            # Watched before a process exists: a watch that fails (epoll ENOMEM) then leaves
            # nothing running behind an attempt the caller takes for not started.
            att.out_fd, att.chan = out_r, chan
            os.set_blocking(out_r, False)
            chan.setblocking(False)
            self.loop.watch(out_r, selectors.EVENT_READ, "internal",
                            lambda m: self._read_output(att))
            self._chan_events(att)
            self.prepare()
            zygote = self.zygote if self.use_zygote() else None
            if zygote is not None and not zygote.ready and self.spawn_until_ready:
                zygote = None
            if zygote is not None and queue is not None and queue.isolation == "reuse":
                pid = self._reuse(att, queue, zygote, out_w, chan_child)
                parent = zygote.pid
            elif zygote is not None and queue is not None:
                pid = self._prefork(att, queue, zygote, out_w, chan_child)
                parent = zygote.pid
            elif zygote is not None:
                zygote.fork(att, out_w, chan_child)
                parent = zygote.pid
            else:
                pid = self._spawn(att, out_w, chan_child)
                parent = os.getpid()
        except BaseException:
            self.loop.unwatch(out_r)
            self.loop.unwatch(chan.fileno())
            att.out_fd = att.chan = None
            os.close(out_r)
            if att.out_file is not None:
                os.close(att.out_file)
            chan.close()
            raise
        finally:
            os.close(out_w)
            chan_child.close()
        spec = {"target": job.target, "method": job.method, "args": job.args,
                "kwargs": job.kwargs, "paths": self.cfg.job_paths, "allow": self.cfg.allow,
                "limits": self.cfg.limits, "parent": parent}
        if zygote is None:              # (a zygote's child, spare or worker has its name from
            spec["title"] = attempt_title(job, number)  # its request) its name in ps (_retitle)
        att.chan_out += self.source_line if zygote is None else b""
        att.chan_out += _json_line(spec).encode()
        self.active[att.token] = att
        if job.timeout is not None:     # SPEC: from the start, whether or not a process exists
            att.timers.append(self.loop.call_later(job.timeout, self.stop, att, "timeout"))
        if zygote is None:
            self.started(att, pid, proc_start_time(pid))
        elif att.worker is not None and pid is not None:    # an idle worker took it
            self.started(att, pid, att.worker.pid_start)
        return att

    def _spawn(self, att: Attempt, out_w: int, chan_child: socket.socket) -> int:
        env = dict(self.env, JOBRUNNER_JOB_ID=str(att.job.id), JOBRUNNER_ATTEMPT=str(att.number))
        argv = [sys.executable, "-I", "-c", CHILD_BOOTSTRAP, "jobrunner-job", str(att.job.id),
                str(att.number)]
        return os.posix_spawn(sys.executable, argv, env, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, out_w, 2),
            (os.POSIX_SPAWN_DUP2, chan_child.fileno(), 3),
        ], setpgroup=0, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD))

    def started(self, att: Attempt, pid: int, pid_start: int | None) -> None:
        att.pid, att.pid_start = pid, pid_start
        # The header of this attempt in its output: written before the first byte the job
        # prints, or with the attempt's end line (note()). Not before: creating a file per
        # attempt would cost a job that prints nothing and succeeds ~0.2 ms of the loop.
        when = wall_clock() - (time.monotonic() - att.started)
        att.header = "attempt %d/%d started %s pid %d" % (
            att.number, att.job.retries + 1, log_time(when), pid)
        self.by_pid[pid] = att
        self.containment.attempt_started(att)
        self.on_started(att)
        if att.stop_reason is not None:             # stopped before we knew its pid
            reason, att.stop_reason = att.stop_reason, None
            self.stop(att, reason)

    def release(self, att: Attempt) -> None:
        """Let the attempt's process run the job: send it the spec it waits for. The daemon
        calls this once the attempt's pid is written to the journal: were the daemon killed
        before that, a restart would not know which process group to kill, and what the job
        had started could run on beside its next attempt."""
        if att.released or att.stop_reason is not None or att.chan is None:
            return
        att.released = True
        self._send_spec(att)
        if att.chan is not None:
            self._chan_events(att)

    def start_failed(self, att: Attempt, error: str, retry_now: bool = False) -> None:
        """No process could be made for `att`, for a reason of the host; `retry_now` when the
        next try will go another way (spawn instead of a zygote that failed)."""
        self.active.pop(att.token, None)
        for timer in att.timers:
            Loop.cancel(timer)
        self._close(att)
        self.on_start_failed(att, error, retry_now)

    # -- pipes -------------------------------------------------------------------------------

    def _chan_events(self, att: Attempt) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if att.chan_out and att.released
                                         else 0)
        self.loop.watch(att.chan.fileno(), events, "internal", lambda m: self._on_chan(att, m))

    def _on_chan(self, att: Attempt, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and att.chan_out and att.released:
            self._send_spec(att)
            if not att.chan_out and att.chan is not None:
                self._chan_events(att)
        if mask & selectors.EVENT_READ:
            self._read_chan(att)

    def _send_spec(self, att: Attempt) -> None:
        """Send what the socket takes of the job spec still to go to the child."""
        if not send_some_of(att.chan, att.chan_out):
            att.chan_out.clear()            # the child is gone; its exit will tell

    def _read_chan(self, att: Attempt) -> None:
        while att.chan is not None:
            try:
                data = att.chan.recv(READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.loop.unwatch(att.chan.fileno())
                att.chan.close()
                att.chan = None
                self._pipes_closed(att)
                return
            if len(att.chan_in) < MAX_REPORT_BYTES:
                att.chan_in += data

    def _pipes_closed(self, att: Attempt) -> None:
        """Both pipes of a forked attempt closed: its process has most likely exited. Its
        zygote should say so soon; if it does not, /proc tells (settle)."""
        if att.chan is None and att.out_fd is None and att.zygote is not None \
                and att.status is None:
            att.timers.append(self.loop.call_later(ZYGOTE_REPLY_TIMEOUT, self.settle, att))

    def _read_output(self, att: Attempt) -> None:
        """Copy what the job printed to its output file, up to max_output_bytes. A chunk the
        disk refuses is dropped (the job goes on), and a note in the file later says how much;
        that output cannot be written is said once, not per chunk or job (SPEC §3)."""
        cap = self.cfg.max_output_bytes
        while att.out_fd is not None:
            try:
                data = os.read(att.out_fd, READ_CHUNK)
            except BlockingIOError:
                return
            if not data:
                self.loop.unwatch(att.out_fd)
                os.close(att.out_fd)
                att.out_fd = None
                self._pipes_closed(att)
                return
            if att.out_capped:
                continue
            if att.header is not None:      # its header first (which opens the file)
                self.note(att.job.id, None, att)
            if att.out_file is None:        # (opened by the attempt's header, unless that failed)
                try:
                    att.out_file = self.open_output(att.job.id, os.O_RDWR | os.O_APPEND
                                                    | os.O_CREAT)
                    att.out_size = os.fstat(att.out_file).st_size
                except OSError as exc:
                    att.out_capped = True
                    self._output_failed(att, len(data), exc)
                    continue
            size = len(data)
            if att.out_lost:
                data = b"\n[jobrunner: %d bytes of output lost: the disk refused them]\n" \
                    % att.out_lost + data
            if att.out_size + len(data) > cap:
                data = data[:max(cap - att.out_size, 0)] + (
                    b"\n[jobrunner: output truncated: max_output_bytes=%d reached]\n" % cap)
                att.out_capped = True
            done = 0
            try:
                while done < len(data):
                    done += os.write(att.out_file, data[done:] if done else data)
            except OSError as exc:          # a full disk loses output, never the job
                if done:                    # all of a chunk or none: the note says what is lost
                    try:
                        os.ftruncate(att.out_file, att.out_size)
                    except OSError:
                        pass
                att.out_capped = False      # what the cap cut is not written either: try again
                self._output_failed(att, size, exc)
                continue
            att.out_size += len(data)
            att.out_lost = 0
            lost = self.output_trouble.worked()
            if lost is not None:
                warn("job output is written again; %d bytes of it were lost meanwhile" % lost)

    def note(self, job_id: int, text: str | None, att: Attempt | None = None,
             create: bool = True) -> None:
        """Write one of the daemon's lines ("[jobrunner] ...", continuation lines indented)
        into the job's output file, where `output` (anyone who may use the socket) reads it,
        after the header of `att` if that is not written yet (text None: the header alone).
        It counts toward max_output_bytes, and goes in past it up to OUTPUT_NOTES_RESERVE
        more (then it is cut). Through the attempt's open file if it has one (else opened
        and kept there), or opened for this line; `create` False: only into a file that
        exists. A disk that refuses it loses the line, never the job."""
        lines = [] if text is None else [text]
        if att is not None and att.header is not None:
            lines.insert(0, att.header)
        data = "".join("[jobrunner] %s\n" % line for line in lines).encode("utf-8", "replace")
        fd = att.out_file if att is not None else None
        opened = fd is None
        try:
            if opened:
                try:
                    fd = self.open_output(job_id, os.O_RDWR | os.O_APPEND
                                          | (os.O_CREAT if create else 0))
                except FileNotFoundError:
                    if create:
                        raise
                    fd = None
                    return
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data            # the job's last line had no end: ours starts one
            room = self.cfg.max_output_bytes + OUTPUT_NOTES_RESERVE - size
            if room <= 0:
                return
            if len(data) > room:
                data = data[:room]
            try:
                _write_all(fd, data)
            except OSError:                     # all of the line or none of it
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass
                raise
            if att is not None:
                if opened:
                    att.out_file, opened = fd, False    # the job's output follows
                att.out_size = size + len(data)
                att.header = None
        except OSError as exc:
            if self.output_trouble.failed(len(data)):
                warn("cannot write job output (job %d: %s); it is dropped until writing "
                     "works again" % (job_id, exc))
        finally:
            if opened and fd is not None:
                os.close(fd)

    def _output_failed(self, att: Attempt, size: int, exc: OSError) -> None:
        att.out_lost += size
        if self.output_trouble.failed(size):
            warn("cannot write job output (job %d: %s); it is dropped until writing works again"
                 % (att.job.id, exc))

    # -- stop and reap -----------------------------------------------------------------------

    def stop(self, att: Attempt, reason: str) -> None:
        """SIGTERM the attempt's process group, SIGKILL after kill_grace."""
        if att.status is not None or att.stop_reason is not None:
            return
        if reason == "timeout" and self.settle(att):
            return                          # it had ended; only its exit was not told yet
        att.stop_reason = reason
        if att.pid is None:                 # no process yet: the attempt ends here
            if att.worker is not None:      # its worker, still being forked, stays idle
                att.worker.attempt = None
                att.worker.drop_handoff()
            if att.zygote is not None:
                att.zygote.withdraw(att)
            self.active.pop(att.token, None)
            for timer in att.timers:
                Loop.cancel(timer)
            self._close(att, output=False)
            self._ended(att)
            return
        kill_group(att.pid, signal.SIGTERM)
        att.timers.append(self.loop.call_later(self.cfg.kill_grace, kill_group, att.pid,
                                               signal.SIGKILL))

    def settle(self, att: Attempt) -> bool:
        """End `att` now if its process has exited but that was not reported yet (its zygote
        is stopped): the status is in /proc while the zombie waits for its parent. Once the
        zombie is gone too (its zygote was killed), an "ok" report and closed pipes say it."""
        if att.pid is None or att.status is not None:
            return False
        status = exit_status(att.pid, att.pid_start)
        if status is None and att.zygote is not None and self._ended_ok(att):
            status = 0                      # a wait status: exited with 0
        if status is None:
            return False
        if att.zygote is None:              # our own child: collect it
            try:
                done, status = os.waitpid(att.pid, os.WNOHANG)
            except ChildProcessError:
                return False
            if not done:
                return False
        self.exited(att.pid, status)
        return True

    def _ended_ok(self, att: Attempt) -> bool:
        """The attempt's process reported "ok", closed its channel (which only it holds), and
        is gone: it returned, whatever its zygote could not tell any more."""
        self._read_chan(att)
        report = att.report() if att.chan is None else None
        if not report or report.get("status") != "ok":
            return False
        start = proc_start_time(att.pid)
        return start is None or (att.pid_start is not None and start != att.pid_start)

    def abandon(self, att: Attempt) -> None:
        """A graceful stop's hard deadline: end `att` whatever its process and zygote do. Its
        group has had SIGKILL; a process stuck past that (uninterruptible sleep) is not waited
        for, and the job is recorded pending like any attempt a stop interrupted."""
        if att.pid is None or att.status is not None:
            self.stop(att, "shutdown")
            return
        if att.stop_reason is None:
            att.stop_reason = "shutdown"
        kill_group(att.pid, signal.SIGKILL)
        self.exited(att.pid, signal.SIGKILL)        # a wait status: killed by SIGKILL

    def reap(self) -> None:
        """After SIGCHLD: collect our own children (spawned attempts and zygotes)."""
        for pid, att in list(self.by_pid.items()):
            if att.zygote is None:
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done, status = pid, 255 << 8
                if done:
                    self.exited(pid, status)
        for zygote in list(self.zygotes):
            try:
                done, _ = os.waitpid(zygote.pid, os.WNOHANG)
            except ChildProcessError:
                done = zygote.pid
            if done:
                self.zygotes.remove(zygote)
                if not zygote.retiring:
                    self.zygote_lost(count=True)
                    warn("the zygote (pid %d) died; its attempts are lost" % zygote.pid)
                zygote.died()
                if zygote is self.zygote:
                    self.zygote = None
        self.containment.reap()
        self.containment.schedule()     # an orphan of ours may have died; a zygote's are ours now

    def exited(self, pid: int, status: int, kill: bool = True) -> None:
        """The process `pid` exited with `status` (a wait status); or, `kill` False, the
        reused worker `pid` ended its attempt and lives on (status 0)."""
        worker = self.worker_pids.get(pid) if kill else None
        if worker is not None:              # a worker exited, or is killed: never used again
            self.retire_worker(worker)
        att = self.by_pid.pop(pid, None)
        if att is None or att.status is not None:
            return
        att.status = status
        self.active.pop(att.token, None)
        for timer in att.timers:
            Loop.cancel(timer)
        att.timers.clear()
        self._read_output(att)
        self._read_chan(att)
        if kill:                                # (a worker killed its attempt's leftovers)
            kill_group(pid, signal.SIGKILL)      # nothing of the attempt outlives it
        self.containment.schedule()             # nor what left its group
        self._close(att, output=False)
        self._ended(att)

    def _ended(self, att: Attempt) -> None:
        """on_exit(att), its output file still open for the attempt's end line (written by
        the Dispatcher through note(): no second open of the file per attempt), closed after."""
        try:
            self.on_exit(att)
        finally:
            if att.out_file is not None:
                os.close(att.out_file)
                att.out_file = None

    def _close(self, att: Attempt, output: bool = True) -> None:
        if att.out_fd is not None:
            self.loop.unwatch(att.out_fd)
            os.close(att.out_fd)
            att.out_fd = None
        if att.chan is not None:
            self.loop.unwatch(att.chan.fileno())
            att.chan.close()
            att.chan = None
        if output and att.out_file is not None:
            os.close(att.out_file)
            att.out_file = None
        if att.zygote is not None:
            att.zygote.attempts.discard(att)
            att.zygote.release()

    # -- reused workers (SPEC §2d) -------------------------------------------------------------
    # Started lazily: a queue's first attempt forks its first worker, and a new one is forked
    # only when an attempt finds none of its queue idle, so workers never outnumber the slots
    # that were busy at once (no idle interpreters for a queue of rare jobs). One is retired
    # (its socket closed: it exits) after max_jobs_per_worker attempts, after an attempt that
    # did not end "ok", on SIGHUP, when its zygote is no longer the current one, and when its
    # queue has more workers than slots (set_workers). One that exits or is killed (a failed
    # attempt, a timeout, a cancel) is forgotten when its zygote reports the exit.

    def _reuse(self, att: Attempt, queue: Queue, zygote: Zygote, out_w: int,
               chan_child: socket.socket) -> int | None:
        """Hand `att` to an idle worker of `queue` (its pid), or to a new one `zygote` forks
        (None: the pid comes with worker_started)."""
        idle = self.idle.get(queue.name)
        while True:
            worker = idle.pop() if idle else None       # the last to finish: the warmest
            if worker is None:
                self.tokens += 1
                worker = Worker(queue, self.tokens, zygote)
                self.workers.add(worker)
            worker.attempt, att.worker, att.zygote = att, worker, worker.zygote
            try:
                if worker.pid is None:
                    out_copy = os.dup(out_w)
                    try:
                        worker.handoff = (out_copy, os.dup(chan_child.fileno()))
                    except OSError:
                        os.close(out_copy)
                        raise
                else:
                    worker.hand(att, out_w, chan_child.fileno())
            except OSError as exc:
                att.worker = att.zygote = None
                worker.attempt = None
                if worker.pid is None:  # no fd free: the start fails, the worker stays
                    self._idle(worker)
                    raise
                # It could not take it: gone meanwhile (its exit not told yet). Another will.
                kill_group(worker.pid, signal.SIGKILL)
                self.retire_worker(worker)
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    raise
                continue
            worker.zygote.attempts.add(att)
            return worker.pid

    # -- spares of fresh queues ---------------------------------------------------------------
    # Forked lazily as well: each attempt of a fresh queue that a zygote starts asks for one
    # more spare while the queue has fewer (idle or being forked) than slots and fewer attempts
    # run than there are CPUs, so a queue has about as many spares as slots busy at once, never
    # more than its slots. An attempt
    # that finds none idle is forked the old way (Zygote.fork). Spares go on SIGHUP, when the
    # zygote is not the current one, when set_workers lowers the slots, and with their zygote;
    # one that dies idle is forgotten when its exit comes, and the next attempt asks for another.

    def _prefork(self, att: Attempt, queue: Queue, zygote: Zygote, out_w: int,
                 chan_child: socket.socket) -> int | None:
        """Hand `att` to an idle spare of `queue` (its pid), or have `zygote` fork it (None:
        the pid comes with started()); either way, ask for a spare to replace the one used."""
        spares = self.spares.get(queue.name)
        pid = None
        while spares and pid is None:
            worker = spares.pop()
            if worker.zygote is not zygote:
                self.retire_worker(worker)
                continue
            worker.attempt, att.worker, att.zygote = att, worker, zygote
            try:
                worker.hand(att, out_w, chan_child.fileno())
            except OSError as exc:
                # Gone meanwhile (died idle, its exit not told yet): the next one, or a fork.
                att.worker = att.zygote = None
                worker.attempt = None
                kill_group(worker.pid, signal.SIGKILL)
                self.retire_worker(worker)
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    raise
                continue
            zygote.attempts.add(att)
            pid = worker.pid
            # Nothing more to say to it (its exit comes from the zygote): its socket goes, so
            # that no job code can write to the daemon through it.
            worker.ctl.close()
            worker.ctl = None
        if pid is None:
            zygote.fork(att, out_w, chan_child)
        # Only while a core is free beside the attempts running: a spare's fork and start
        # overlap them there; on a busy host they cost CPU (~10 % of a no-op job: the spare
        # runs on cold caches) for no time won (2 slots on 2 cores: x0.92 jobs/s; 1: x1.20).
        if len(self.active) + 1 < self.cpus and not zygote.retiring and sum(
                w.once and w.attempt is None and w.queue is queue for w in self.workers) \
                < queue.workers:
            self.tokens += 1
            try:
                self.workers.add(Worker(queue, self.tokens, zygote, once=True))
            except OSError:             # no fd free: the attempt goes on; a later one asks
                pass
        return pid

    def worker_started(self, worker: Worker, pid: int, pid_start: int | None) -> None:
        """Its zygote forked `worker`: hand it the attempt that waits for it, if any."""
        worker.pid, worker.pid_start = pid, pid_start
        if worker.ctl is None:          # retired meanwhile
            kill_group(pid, signal.SIGKILL)
            return
        self.worker_pids[pid] = worker
        if not worker.once:             # a spare says nothing: its exit comes from the zygote
            self.loop.watch(worker.ctl.fileno(), selectors.EVENT_READ, "internal",
                            lambda mask: self._on_worker(worker))
        att, handoff = worker.attempt, worker.handoff
        worker.handoff = None
        if att is None or handoff is None:
            self._idle(worker)
            return
        try:
            worker.hand(att, *handoff)
        except OSError as exc:
            worker.attempt = att.worker = None
            kill_group(pid, signal.SIGKILL)
            self.retire_worker(worker)
            self.start_failed(att, "could not hand the job to its worker: %s" % exc,
                              retry_now=True)
            return
        finally:
            for fd in handoff:
                os.close(fd)
        self.started(att, pid, pid_start)

    def worker_start_failed(self, worker: Worker, error: str, retry_now: bool = False) -> None:
        """No process could be made for `worker`; the attempt that waited for it did not start."""
        att = worker.attempt
        self.retire_worker(worker)
        if att is not None:
            self.start_failed(att, error, retry_now)

    def _on_worker(self, worker: Worker) -> None:
        while worker.ctl is not None:
            try:
                data, _, flags, _ = worker.ctl.recvmsg(256)
            except BlockingIOError:
                return
            except OSError:
                data, flags = b"", 0
            if not data:                # it exited: its zygote tells how (exited())
                self.loop.unwatch(worker.ctl.fileno())
                return
            att = worker.attempt
            if Worker.parse(data, flags) is None or att is None or att.pid != worker.pid:
                # Not what our worker says (job code wrote to the socket): it is killed, and
                # its exit ends the attempt as failed.
                kill_group(worker.pid, signal.SIGKILL)
                self.retire_worker(worker)
                return
            self._attempt_done(worker, att)

    def _attempt_done(self, worker: Worker, att: Attempt) -> None:
        """`worker` ran `att` to its report and cleaned up after it (its leftovers killed, the
        output pipe let go): the attempt ends with status 0, and the worker is idle again
        unless it must go."""
        worker.attempt = None
        worker.done += 1
        self.exited(worker.pid, 0, kill=False)
        report = att.report()
        max_jobs = self.cfg.max_jobs_per_worker if worker.queue.name == DEFAULT_QUEUE else \
            self.cfg.queues.get(worker.queue.name, QUEUE_DEFAULTS)["max_jobs_per_worker"]
        if worker.retiring or att.stop_reason is not None or worker.done >= max_jobs \
                or not report or report["status"] != "ok" or worker.zygote is not self.zygote \
                or worker.queue.isolation != "reuse":
            if att.stop_reason is not None:     # its group has had SIGTERM: it is going
                kill_group(worker.pid, signal.SIGKILL)
            self.retire_worker(worker)
        else:
            self._idle(worker)

    def _idle(self, worker: Worker) -> None:
        if worker.retiring or worker.zygote is not self.zygote:     # SIGHUP meanwhile
            self.retire_worker(worker)
            return
        idle = self.idle.setdefault(worker.queue.name, []) if not worker.once else \
            self.spares.setdefault(worker.queue.name, [])
        if worker not in idle:
            idle.append(worker)
        self.trim_workers(worker.queue)

    def trim_workers(self, queue: Queue) -> None:
        """Retire idle workers of `queue` while it has more workers than slots; and idle spares
        while it has more spares (idle or being forked) than slots, or is no fresh queue."""
        idle = self.idle.get(queue.name)
        while idle and sum(w.queue is queue and not w.once for w in self.workers) \
                > queue.workers:
            self.retire_worker(idle[0])
        spares = self.spares.get(queue.name)
        while spares and (queue.isolation == "reuse" or sum(
                w.once and w.attempt is None and w.queue is queue for w in self.workers)
                > queue.workers):
            self.retire_worker(spares[0])

    def retire_worker(self, worker: Worker) -> None:
        """Forget `worker` and close its socket: it exits if it lives (when its attempt, if
        any, is over: the caller deals with that attempt)."""
        self.workers.discard(worker)
        if worker.pid is not None and self.worker_pids.get(worker.pid) is worker:
            del self.worker_pids[worker.pid]
        idle = (self.spares if worker.once else self.idle).get(worker.queue.name)
        if idle and worker in idle:
            idle.remove(worker)
        worker.drop_handoff()
        if worker.ctl is not None:
            self.loop.unwatch(worker.ctl.fileno())
            worker.ctl.close()
            worker.ctl = None

    def workers_lost(self, zygote: Zygote) -> None:
        """`zygote` died: its workers die with it (PDEATHSIG); forget them."""
        for worker in list(self.workers):
            if worker.zygote is zygote:
                if worker.pid is not None:
                    kill_group(worker.pid, signal.SIGKILL)
                self.retire_worker(worker)

    def restart(self) -> None:
        """SIGHUP: the next attempt comes from a new zygote, which sees changed job code;
        reused workers go too (busy ones after their attempt)."""
        for worker in list(self.workers):
            if worker.attempt is None and worker.pid is not None:
                self.retire_worker(worker)
            else:
                worker.retiring = True
        if self.zygote is not None:
            self.zygote.retire()
            self.zygote = None
        self.prepare()

    def close(self) -> None:
        for worker in list(self.workers):
            self.retire_worker(worker)
        self.containment.finish(self.cfg.kill_grace)
        for zygote in self.zygotes:
            zygote.retire()


####################################################################################################
#  Protocol: decoding and validation
####################################################################################################

def _reject_constant(name: str):
    raise ValueError("%s is not a JSON number" % name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range: %s" % text[:40])
    return value


_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)  # once
_decode_request = _decoder.decode
_scan_request = _decoder.scan_once      # without decode()'s two whitespace matches (~0.6 µs)


def decode_request(line: bytes) -> dict:
    """One request line -> dict, or ProtocolError("bad_request")."""
    try:
        text = line.decode("utf-8")
        try:            # the usual line: one value, nothing around it
            req, end = _scan_request(text, 0)
            if end != len(text):
                raise ValueError
        except Exception:           # anything else: decode() again, for its error message
            req = _decode_request(text)
    except UnicodeDecodeError as exc:
        raise ProtocolError("bad_request", "request is not UTF-8 (byte %d)" % exc.start) from None
    except RecursionError:
        raise ProtocolError("bad_request", "request nests too deeply") from None
    except ValueError as exc:
        raise ProtocolError("bad_request", "request is not JSON: %s" % exc) from None
    if not isinstance(req, dict):
        raise ProtocolError("bad_request", "request must be a JSON object")
    if len(text) > JSON_MAX_DEPTH and text.count("[") + text.count("{") > JSON_MAX_DEPTH \
            and too_deep(req, JSON_MAX_DEPTH):
        raise ProtocolError("bad_request", "request nests deeper than %d levels" % JSON_MAX_DEPTH)
    if _SURROGATE_ESCAPE.search(text):
        try:                            # a lone surrogate could never be written back out
            json.dumps(req, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError("bad_request", "request has a lone UTF-16 surrogate "
                                "(\\ud800-\\udfff) that is not a character") from None
    return req


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def too_deep(value, limit: int) -> bool:
    """Whether lists and objects (as json.loads makes them) nest more than `limit` levels
    (they would not encode back). Level by level: an add_batch of a thousand flat jobs costs
    a few type checks per job."""
    level = [value]
    for _ in range(limit):
        inner = []
        for container in level:
            for item in (container if type(container) is list else container.values()):
                if type(item) is list or type(item) is dict:
                    inner.append(item)
        if not inner:
            return False
        level = inner
    return True


def encode_reply(fields: dict) -> bytes:
    return (_encode({"ok": True, **fields}) + "\n").encode("utf-8")


def encode_error(code: str, message: str) -> bytes:
    return (json.dumps({"ok": False, "error": {"code": code, "message": message}},
                       separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


ADD_FIELDS = ("target", "method", "args", "kwargs", "priority", "delay", "run_at", "retries",
              "retry_delay", "backoff", "timeout", "key", "queue", "after",
              "on_parent_failure")
# op -> the fields it accepts besides "op"; anything else is a bad_request (typos never pass).
OP_FIELDS: dict[str, tuple[str, ...]] = {
    "hello": (), "add": ADD_FIELDS, "add_batch": ("jobs",), "get": ("id",),
    "list": ("state", "target", "queue", "schedule", "limit", "order", "after_id", "before_id"),
    "cancel": ("id", "where"),
    "retry": ("id", "where"), "wait": ("id", "timeout"), "output": ("id", "offset", "limit"),
    "stats": (), "pause": ("queue", "schedule"), "resume": ("queue", "schedule"),
    "prune": ("older_than",), "queues": (), "set_workers": ("queue", "workers"),
    "schedules": (), "trigger": ("schedule",),
    "metrics": (), "activity": (),
    "update": ("id", "priority", "delay", "run_at", "queue"),
}
WHERE_FIELDS = ("state", "target", "queue", "schedule")     # of `cancel`/`retry` `where`
_WITH_OP = {fields: frozenset(fields + ("op",)) for fields in OP_FIELDS.values()}
# Ops that change state: refused while stopping, answered only after the journal is durable.
MUTATING = frozenset({"add", "add_batch", "cancel", "retry", "pause", "resume", "prune",
                      "trigger", "update"})


def check_fields(req: dict, allowed: tuple[str, ...], where: str = "") -> None:
    if req.keys() <= _WITH_OP.get(allowed, frozenset()):
        return                          # the usual case, in one C call
    for name in req:
        if name != "op" and name not in allowed:
            raise ProtocolError("bad_request", "%sunknown field %r" % (where, name))


def get_int(req: dict, name: str, default, lo: int, hi: int, where: str = "") -> int:
    value = req.get(name, default)
    if value is default and name not in req:
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError("bad_request", "%s%s must be an integer" % (where, name))
    if not lo <= value <= hi:
        raise ProtocolError("bad_request", "%s%s must be between %d and %d" % (where, name, lo, hi))
    return value


def get_seconds(req: dict, name: str, default, lo: float, hi: float, where: str = "",
                nullable: bool = False):
    if name not in req:
        return default
    value = req[name]
    if value is None and nullable:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ProtocolError("bad_request", "%s%s must be a number of seconds%s"
                            % (where, name, " or null" if nullable else ""))
    if not lo <= value <= hi:
        raise ProtocolError("bad_request", "%s%s must be between %g and %g" % (where, name, lo, hi))
    return float(value)


def get_id(req: dict) -> int:
    if "id" not in req:
        raise ProtocolError("bad_request", "missing field 'id'")
    return get_int(req, "id", None, 0, 2 ** 63 - 1)


def get_queue_name(req: dict, where: str = "") -> str:
    """The `queue` field: a queue's name (SPEC §2a), or bad_request."""
    name = req.get("queue")
    if not isinstance(name, str) or not QUEUE_NAME.match(name):
        raise ProtocolError("bad_request", "%squeue must be a name of 1-64 of A-Z a-z 0-9 _ . -"
                            % where)
    return sys.intern(name)


def get_after(req: dict, where: str = "", position: int | None = None) -> list[int]:
    """`after` of an add object: distinct nonzero ints, at most MAX_AFTER, in the order given
    (a repeated id is kept once). Negative entries only in the job at `position` of an
    add_batch, and pointing at an earlier job of it; the caller resolves them and checks that
    the positive ones exist."""
    after = req.get("after")
    if after is None:
        return NO_AFTER
    if not isinstance(after, list):
        raise ProtocolError("bad_request", "%safter must be a list of job ids" % where)
    if len(after) > MAX_AFTER:
        raise ProtocolError("bad_request", "%safter has %d entries; at most %d"
                            % (where, len(after), MAX_AFTER))
    for entry in after:
        if not isinstance(entry, int) or isinstance(entry, bool) or entry == 0 \
                or not -2 ** 63 < entry < 2 ** 63:
            raise ProtocolError("bad_request", "%safter entries must be job ids (nonzero "
                                "integers), not %s" % (where, json.dumps(entry)[:50]))
        if entry < 0:
            if position is None:
                raise ProtocolError("bad_request", "%safter entry %d: negative entries name an "
                                    "earlier job of the same add_batch" % (where, entry))
            if -entry > position:
                raise ProtocolError("bad_request", "%safter entry %d points before the start "
                                    "of the batch (this is job %d of it)"
                                    % (where, entry, position))
    return list(dict.fromkeys(after)) or NO_AFTER


def get_schedule_name(req: dict, where: str = "") -> str:
    """The `schedule` field: a schedule's name (SPEC §2c), or bad_request."""
    name = req.get("schedule")
    if not isinstance(name, str) or not QUEUE_NAME.match(name):
        raise ProtocolError("bad_request", "%sschedule must be a name of 1-64 of A-Z a-z 0-9 _ . -"
                            % where)
    return name


def allow_advice(target: str, cfg: "Config") -> str:
    """What a `not_allowed` refusal adds (SPEC §4): the allow list consulted, where it comes
    from (the config file in use, or the embedded defaults), and how to extend it."""
    shown = json.dumps(cfg.allow)
    if len(shown) > ALLOW_SHOWN:
        shown = shown[:ALLOW_SHOWN] + "...]"
    example = json.dumps(target.split(":", 1)[0] + ":*")
    if cfg.path:
        return ("consulted: allow = %s in %s; to allow it, add a pattern that matches it (such as "
                "%s) to the key allow there and reload the daemon (SIGHUP)"
                % (shown, os.path.abspath(cfg.path), example))
    return ("consulted: allow = %s, the embedded defaults (no config file); to allow it, start "
            "jobrunnerd with --config FILE whose key allow has a pattern that matches it (such as %s)"
            % (shown, example))


def validate_add(req: dict, cfg: "Config", now: float, where: str = "",
                 position: int | None = None) -> dict:
    """The fields of a new job from an `add` object, defaults filled in from its queue's table
    in the config, then the config's top level (`position`: its place in an add_batch, where
    `after` may name earlier jobs of it)."""
    if req.keys() <= _PLAIN_ADD:
        fields = plain_add(req, cfg, now)
        if fields is not None:
            return fields
    check_fields(req, ADD_FIELDS, where)
    if "queue" in req and req["queue"] != DEFAULT_QUEUE:
        queue = get_queue_name(req, where)
        table = cfg.queues.get(queue)
        if table is None:
            raise ProtocolError("not_found", "%squeue %r is not declared in the config "
                                "([queues.%s])" % (where, queue, queue))
    else:
        queue, table = DEFAULT_QUEUE, NO_KWARGS
    target = req.get("target")
    if not isinstance(target, str):
        raise ProtocolError("bad_request", "%starget must be a string 'module:Attr'" % where)
    verdict = target_verdict(target, cfg.allow)
    if verdict == "bad_request":
        raise ProtocolError("bad_request", "%starget %r is not 'package.module:Attr'"
                            % (where, target[:100]))
    if verdict == "private":
        raise ProtocolError("bad_request", "%starget %r: names in Attr starting with '_' are "
                            "refused" % (where, target))
    if verdict == "not_allowed":
        raise ProtocolError("not_allowed", "%starget %s is not in the allow list; %s"
                            % (where, target, allow_advice(target, cfg)))
    method = req.get("method")
    if method is not None:
        if not isinstance(method, str) or len(method) > 200:
            raise ProtocolError("bad_request", "%smethod must be a string or null" % where)
        if method.startswith("_"):
            raise ProtocolError("bad_request", "%smethod names starting with '_' are refused"
                                % where)
        if not METHOD_RE.match(method):
            raise ProtocolError("bad_request", "%smethod %r is not an identifier" % (where, method))
    args = req.get("args", NO_ARGS)
    if not isinstance(args, list):
        raise ProtocolError("bad_request", "%sargs must be a list" % where)
    kwargs = req.get("kwargs", NO_KWARGS)
    if not isinstance(kwargs, dict):
        raise ProtocolError("bad_request", "%skwargs must be an object" % where)
    args, kwargs = args or NO_ARGS, kwargs or NO_KWARGS
    if "delay" in req and "run_at" in req:
        raise ProtocolError("bad_request", "%sgive delay or run_at, not both" % where)
    delay = None
    if "run_at" in req:
        run_at = get_seconds(req, "run_at", now, 0.0, now + MAX_DELAY, where)
    else:
        delay = get_seconds(req, "delay", 0.0, 0.0, MAX_DELAY, where)
        run_at = now + delay if delay else now      # no delay: share the created_at float
    on_parent_failure = req.get("on_parent_failure", "cancel")
    if on_parent_failure not in ("cancel", "run"):
        raise ProtocolError("bad_request", "%son_parent_failure must be 'cancel' or 'run'" % where)
    backoff = req.get("backoff", table.get("backoff", cfg.backoff))
    if backoff not in ("fixed", "exponential"):
        raise ProtocolError("bad_request", "%sbackoff must be 'fixed' or 'exponential'" % where)
    backoff = "fixed" if backoff == "fixed" else "exponential"     # one shared string
    key = req.get("key")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS):
        raise ProtocolError("bad_request", "%skey must be a non-empty string of at most %d "
                            "characters, or null" % (where, MAX_KEY_CHARS))
    return {
        "target": target, "method": method, "args": args, "kwargs": kwargs,
        "priority": get_int(req, "priority", table.get("priority", 0), -MAX_PRIORITY,
                            MAX_PRIORITY, where),
        "run_at": run_at,
        "retries": get_int(req, "retries", table.get("retries", cfg.retries), 0, MAX_RETRIES,
                           where),
        "retry_delay": get_seconds(req, "retry_delay", table.get("retry_delay", cfg.retry_delay),
                                   0.0, MAX_DELAY, where),
        "backoff": backoff,
        "timeout": get_seconds(req, "timeout", table.get("timeout", cfg.timeout) or None, 0.001,
                               MAX_DELAY, where, nullable=True),
        "key": key,
        "queue": queue,
        "after": get_after(req, where, position),
        "on_parent_failure": "run" if on_parent_failure == "run" else "cancel",
        # a blocked job's delay counts from its unblocking (§2b); create() drops it otherwise
        "delay": delay or None,
    }


_PLAIN_ADD = frozenset({"op", "target", "args", "kwargs"})    # the common shape of an add
_PLAIN: list = [None, None, None]   # [the config, its defaults then, the fields of a plain add]


def plain_add(req: dict, cfg: "Config", now: float) -> dict | None:
    """validate_add() of an add object with no field but target, args and kwargs, when they
    are valid: the rest are the default queue's defaults, copied from one dict made per
    config (again if its defaults change) instead of checked field by field. None lets
    validate_add() decide (and word the error)."""
    target = req.get("target")
    args = req.get("args", NO_ARGS)
    kwargs = req.get("kwargs", NO_KWARGS)
    if type(target) is not str or type(args) is not list or type(kwargs) is not dict \
            or target_verdict(target, cfg.allow) != "ok":
        return None
    defaults = (cfg.retries, cfg.retry_delay, cfg.backoff, cfg.timeout)
    if _PLAIN[0] is not cfg or _PLAIN[1] != defaults:      # another config, or changed
        backoff = cfg.backoff
        _PLAIN[:] = [cfg, defaults, None if backoff not in ("fixed", "exponential") else {
            "target": None, "method": None, "args": NO_ARGS, "kwargs": NO_KWARGS,
            "priority": 0, "run_at": None, "retries": cfg.retries,
            "retry_delay": cfg.retry_delay,
            "backoff": "fixed" if backoff == "fixed" else "exponential",
            "timeout": cfg.timeout or None, "key": None, "queue": DEFAULT_QUEUE,
            "after": NO_AFTER, "on_parent_failure": "cancel", "delay": None}]
    if _PLAIN[2] is None:
        return None
    fields = _PLAIN[2].copy()
    fields["target"], fields["run_at"] = target, now
    fields["args"], fields["kwargs"] = args or NO_ARGS, kwargs or NO_KWARGS
    return fields


def validate_update(req: dict, cfg: "Config", now: float, blocked: bool) -> dict:
    """The changes an `update` request asks of a job (JobTable.amend takes them): `priority`,
    `queue` (declared: not_found otherwise), and `delay` or `run_at` as at `add`: a blocked
    job's delay counts from its unblocking (§2b), a pending job's from now."""
    if not req.keys() & {"priority", "delay", "run_at", "queue"}:
        raise ProtocolError("bad_request", "give at least one of priority, delay or run_at, queue")
    if "delay" in req and "run_at" in req:
        raise ProtocolError("bad_request", "give delay or run_at, not both")
    changes: dict = {}
    if "priority" in req:
        changes["priority"] = get_int(req, "priority", None, -MAX_PRIORITY, MAX_PRIORITY)
    if "run_at" in req:
        changes["run_at"] = get_seconds(req, "run_at", None, 0.0, now + MAX_DELAY)
        changes["delay"] = None                 # an explicit time holds as it is
    elif "delay" in req:
        delay = get_seconds(req, "delay", None, 0.0, MAX_DELAY)
        changes["run_at"] = now + delay
        changes["delay"] = (delay or None) if blocked else None   # pending: counted in run_at
    if "queue" in req:
        queue = changes["queue"] = get_queue_name(req)
        if queue != DEFAULT_QUEUE and queue not in cfg.queues:
            raise ProtocolError("not_found", "queue %r is not declared in the config "
                                "([queues.%s])" % (queue, queue))
    return changes


_VERDICTS: list = [None, {}]    # [the allow list they were made for, {target: verdict}]


def target_verdict(target: str, allow: list) -> str:
    """"ok", "bad_request" (not 'package.module:Attr'), "private" (a step of Attr starts with
    "_") or "not_allowed" (no allow pattern matches), remembered per target: a batch names the same target a thousand times."""
    if _VERDICTS[0] is not allow or len(_VERDICTS[1]) >= 4096:
        _VERDICTS[:] = [allow, {}]          # a reload brings a new list; bounded memory
    verdict = _VERDICTS[1].get(target)
    if verdict is None:
        attr = target.partition(":")[2]
        if len(target) > 500 or not TARGET_RE.match(target):
            verdict = "bad_request"
        elif attr.startswith("_") or "._" in attr:
            verdict = "private"             # SPEC §2: no Attr step starts with "_"
        elif not any(fnmatch.fnmatchcase(target, pattern) for pattern in allow):
            verdict = "not_allowed"
        else:
            verdict = "ok"
        _VERDICTS[1][target] = verdict
    return verdict


def list_reply(jobs: list, limit: int, total: int) -> dict:
    """A `list` reply from up to limit + 1 jobs: the page, `more` when there was one past it."""
    return {"jobs": [j.record() for j in jobs[:limit]], "more": len(jobs) > limit, "total": total}


def get_pattern(req: dict, name: str = "target", where: str = "") -> str | None:
    """The fnmatch pattern `req[name]` of list (and of cancel/retry `where`), or None."""
    pattern = req.get(name)
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise ProtocolError("bad_request", "%s%s must be a pattern string" % (where, name))
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ProtocolError("bad_request", "%s%s pattern is longer than %d characters"
                            % (where, name, MAX_PATTERN_CHARS))
    return pattern


def utf8_prefix(data: bytes, complete: bool) -> bytes:
    """`data` without a character cut at its end (unless `complete`: the file ends there)."""
    if complete:
        return data
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:                     # a lead byte (or ASCII)
            need = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data[:-back] if need > back and byte >= 0xC0 else data
    return data


####################################################################################################
#  Schedules: cron expressions, fire times, [schedules.NAME] tables
####################################################################################################
#
# Pure: nothing here reads the clock or touches the daemon. A CronExpr is parsed once into one set
# per field (as Vixie cron's entry.c does with bit sets); next_fire() walks the calendar field by
# field in local wall time (month, then day, hour, minute, carrying over), so a rare expression
# such as "0 0 29 2 *" costs a handful of steps, never a minute-by-minute scan. Each wall time
# found is then turned into an instant by the DST rules in CronExpr.instant().

CRON_FIELDS = (                       # name, lowest, highest, names (their index + lowest)
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day-of-month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
                      "nov", "dec")),
    ("day-of-week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
CRON_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MAX_CRON_CHARS = 1000                 # five fields; longer is a mistake, not an expression
CRON_SEARCH_YEARS = 400               # dates and weekdays repeat every 400 years: a day the
                                      # parser let through comes back within that (Feb 29 on a
                                      # Sunday: 2088, then 2128)
MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)   # most a month can have
SCHEDULE_NAME_RE = QUEUE_NAME                                    # SPEC §2c: as queue names
SCHEDULE_JOB_KEYS = ("target", "method", "args", "kwargs", "priority", "retries", "retry_delay",
                     "backoff", "timeout")                       # passed on to each job's `add`
SCHEDULE_KEYS = SCHEDULE_JOB_KEYS + ("queue", "cron", "every", "timezone", "missed", "overlap")
MIN_EVERY = 0.001                     # SPEC: every > 0; below a millisecond is a busy loop


def _cron_value(field: str, text: str, lo: int, names: tuple) -> int:
    word = text.lower()
    if word in names:
        return names.index(word) + lo
    if not text.isdigit() or not text.isascii():
        if text.isalpha():
            raise ValueError("%s: unknown name %r" % (field, text))
        raise ValueError("%s: %r is not a number%s" % (field, text, " or a name" if names else ""))
    return int(text)


def parse_cron_field(index: int, text: str) -> tuple[frozenset, bool]:
    """One field of a cron expression -> (the values it allows, whether it starts with "*").
    Items are `*`, `a`, `a-b`, each optionally `/step`; `a/step` runs from a to the field's end
    (as in Vixie cron). Raises ValueError naming the field."""
    field, lo, hi, names = CRON_FIELDS[index]
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise ValueError("%s: empty item in %r" % (field, text))
        span, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or not step_text.isascii():
                raise ValueError("%s: step %r is not a whole number" % (field, step_text))
            step = int(step_text)
            if step == 0:
                raise ValueError("%s: step 0 in %r (a step is 1 or more)" % (field, item))
        if span == "*":
            first, last = lo, hi
        else:
            start, dash, end = span.partition("-")
            if not start or (dash and not end):
                raise ValueError("%s: %r is not a value or a range" % (field, item))
            first = _cron_value(field, start, lo, names)
            last = _cron_value(field, end, lo, names) if dash else (hi if slash else first)
            for value in (first, last):
                if not lo <= value <= hi:
                    raise ValueError("%s: %d is out of %d-%d" % (field, value, lo, hi))
            if first > last:
                raise ValueError("%s: range %r runs backwards" % (field, item))
        values.update(range(first, last + 1, step))
    if index == 4 and 7 in values:     # 7 is Sunday too
        values.discard(7)
        values.add(0)
    return frozenset(values), text.startswith("*")


class CronExpr:
    """A parsed cron expression: `minute hour day-of-month month day-of-week` or a macro.
    Callers use next_fire(after, zone) and the `text` it was made from; next_wall() and
    instant() are its two steps, public for tests."""

    __slots__ = ("text", "minutes", "hours", "days", "months", "weekdays", "day_rule",
                 "_hours_sorted", "_minutes_sorted")

    def __init__(self, text: str):
        if not isinstance(text, str) or len(text) > MAX_CRON_CHARS:
            raise ValueError("cron: must be a string of five fields or a macro such as @daily")
        self.text = text
        expanded = text.strip()
        if expanded.startswith("@"):
            if expanded.lower() not in CRON_MACROS:
                raise ValueError("cron: unknown macro %r (known: %s)"
                                 % (expanded, ", ".join(CRON_MACROS)))
            expanded = CRON_MACROS[expanded.lower()]
        parts = expanded.split()
        if len(parts) != 5:
            raise ValueError("cron: %d field(s) in %r; expected 5: minute hour day-of-month month "
                             "day-of-week" % (len(parts), text))
        parsed = [parse_cron_field(i, part) for i, part in enumerate(parts)]
        (self.minutes, _), (self.hours, _), (self.days, dom_star), (self.months, _), \
            (self.weekdays, dow_star) = parsed
        # Vixie cron: when both day fields are restricted (neither starts with "*"), a day
        # matches if either does; otherwise both must.
        self.day_rule = "either" if not (dom_star or dow_star) else "both"
        self._hours_sorted = sorted(self.hours)
        self._minutes_sorted = sorted(self.minutes)
        if self.day_rule == "both" and not any(day <= MONTH_DAYS[month - 1]
                                               for month in self.months for day in self.days):
            raise ValueError("day-of-month: no day in %r exists in the month(s) %r"
                             % (parts[2], parts[3]))

    def __repr__(self) -> str:
        return "CronExpr(%r)" % self.text

    def __eq__(self, other) -> bool:
        return isinstance(other, CronExpr) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple:
        return (self.minutes, self.hours, self.days, self.months, self.weekdays, self.day_rule)

    def _first_day(self, year: int, month: int, day: int) -> int | None:
        """The first matching day of the month from `day` on, or None; whole numbers only."""
        last = MONTH_DAYS[month - 1]
        if month == 2 and (year % 4 or (year % 100 == 0 and year % 400)):
            last = 28
        weekday = datetime.date(year, month, day).isoweekday() % 7     # Sunday: 7 -> 0
        either = self.day_rule == "either"
        days, weekdays = self.days, self.weekdays
        for d in range(day, last + 1):
            if ((d in days or weekday in weekdays) if either
                    else (d in days and weekday in weekdays)):
                return d
            weekday = (weekday + 1) % 7
        return None

    def next_wall(self, start: datetime.datetime) -> datetime.datetime:
        """The first wall-clock minute at or after `start` (naive, seconds ignored) that the
        expression matches; field by field, carrying over into the next day, month or year."""
        year, month, day, hour, minute = start.year, start.month, start.day, start.hour, start.minute
        limit = year + CRON_SEARCH_YEARS
        while year <= limit:
            if month not in self.months:
                month, day, hour, minute = month + 1, 1, 0, 0
                if month > 12:
                    year, month = year + 1, 1
                continue
            found = self._first_day(year, month, day)
            if found is None:
                month, day, hour, minute = month + 1, 1, 0, 0
                if month > 12:
                    year, month = year + 1, 1
                continue
            if found != day:
                day, hour, minute = found, 0, 0
            date = datetime.date(year, month, day)
            hour_i = bisect.bisect_left(self._hours_sorted, hour)
            if hour_i == len(self._hours_sorted):
                date += datetime.timedelta(days=1)
                year, month, day, hour, minute = date.year, date.month, date.day, 0, 0
                continue
            if self._hours_sorted[hour_i] != hour:
                hour, minute = self._hours_sorted[hour_i], 0
            minute_i = bisect.bisect_left(self._minutes_sorted, minute)
            if minute_i == len(self._minutes_sorted):
                hour, minute = hour + 1, 0
                if hour == 24:
                    date += datetime.timedelta(days=1)
                    year, month, day, hour = date.year, date.month, date.day, 0
                continue
            return datetime.datetime(year, month, day, hour, self._minutes_sorted[minute_i])
        raise ValueError("cron: %r does not fire within %d years" % (self.text, CRON_SEARCH_YEARS))

    def next_fire(self, after: float, zone: datetime.tzinfo) -> float:
        """The first fire time (epoch seconds) strictly after `after`, in `zone`'s local time."""
        wall = datetime.datetime.fromtimestamp(after, zone).replace(tzinfo=None, second=0,
                                                                  microsecond=0)
        # Wall times run in order except inside a repeated hour, where the ones already passed
        # (their first occurrence is before `after`) are skipped: at most an hour of them.
        while True:
            wall = self.next_wall(wall)
            fire = self.instant(wall, zone)
            if fire > after:
                return fire
            wall += datetime.timedelta(minutes=1)

    @staticmethod
    def instant(wall: datetime.datetime, zone: datetime.tzinfo) -> float:
        """The moment a local wall time fires. DST (SPEC §2c): a wall time that occurs twice
        fires at its first occurrence (fold=0); one that does not exist (in a spring-forward
        gap) fires at the first instant after the gap, the transition itself."""
        first = wall.replace(tzinfo=zone, fold=0).timestamp()
        second = wall.replace(tzinfo=zone, fold=1).timestamp()
        if second >= first:             # unique (equal), or repeated: the earlier one
            return first
        # In a gap, PEP 495 maps fold=0 with the offset before the change and fold=1 with the
        # one after, so the transition lies between `second` and `first`: find its second.
        before = wall.replace(tzinfo=zone, fold=0).utcoffset()
        lo, hi = math.floor(second), math.ceil(first)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if datetime.datetime.fromtimestamp(mid, zone).utcoffset() == before:
                lo = mid
            else:
                hi = mid
        return float(hi)


def local_zone() -> tuple[str, datetime.tzinfo]:
    """The host's local time as a tzinfo, the way the C library finds it: $TZ when it names a
    zone, else /etc/localtime (read through zoneinfo, so DST follows the tz database), else
    UTC. The name is the zone's key when it can be told ("Europe/Berlin"), else "localtime"."""
    import zoneinfo
    tz = os.environ.get("TZ", "").lstrip(":")
    if tz:
        try:
            if tz.startswith("/"):
                with open(tz, "rb") as f:
                    return tz, zoneinfo.ZoneInfo.from_file(f, key=tz)
            return tz, zoneinfo.ZoneInfo(tz)
        except (OSError, ValueError, zoneinfo.ZoneInfoNotFoundError):
            pass                        # a POSIX rule string or a typo: the file, as below
    path = "/etc/localtime"
    real = os.path.realpath(path)
    name = real.split("/zoneinfo/", 1)[1] if "/zoneinfo/" in real else "localtime"
    try:
        if name != "localtime":
            return name, zoneinfo.ZoneInfo(name)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        pass
    try:
        with open(path, "rb") as f:
            return name, zoneinfo.ZoneInfo.from_file(f, key=name)
    except (OSError, ValueError):
        return "UTC", datetime.timezone.utc


class Schedule(NamedTuple):
    """One [schedules.NAME] table, checked. The daemon asks next_fire() (and latest_fire() for
    `missed = "once"`) and queues add_request() for each fire."""
    name: str
    cron: CronExpr | None           # exactly one of cron and every
    every: float | None
    zone: datetime.tzinfo
    zone_name: str                  # the IANA name, or the local zone's (see local_zone())
    local: bool                     # no `timezone` given: the host's local time
    missed: str                     # "once" or "skip"
    overlap: bool
    queue: str
    job: dict                       # the job keys given (target, args, ...): an `add` request

    def next_fire(self, after: float, anchor: float | None = None) -> float:
        """The first fire time strictly after `after`. For `every`, fire times are anchor +
        k*every (k >= 1); the anchor is when the schedule was first seen (or its last_run_at),
        and defaults to `after`."""
        if self.cron is not None:
            return self.cron.next_fire(after, self.zone)
        anchor = after if anchor is None else anchor
        k = max(1, math.floor((after - anchor) / self.every) + 1)
        while anchor + k * self.every <= after:      # float rounding
            k += 1
        return anchor + k * self.every

    def latest_fire(self, since: float, until: float, anchor: float | None = None) -> float | None:
        """The latest fire time in (since, until], or None: what `missed = "once"` queues after
        the daemon was down. A bisection over next_fire(), which never decreases: about 40
        calls however many fires were missed."""
        if self.next_fire(since, anchor) > until:
            return None
        lo, hi = since, until           # next_fire(lo) <= until < next_fire(hi)
        while hi - lo > 0.25:           # fire times are whole seconds (cron) or an anchor grid
            mid = (lo + hi) / 2
            if self.next_fire(mid, anchor) <= until:
                lo = mid
            else:
                hi = mid
        return self.next_fire(lo, anchor)

    def add_request(self) -> dict:
        """The `add` request one fire makes (defaults come from the config then, as for any
        add); `queue` only when not the default."""
        req = dict(self.job)
        if self.queue != "default":
            req["queue"] = self.queue
        return req

    def describe(self) -> str:
        """'cron "0 3 * * *" in Europe/Berlin' or 'every 300s'; for people."""
        if self.cron is not None:
            return "cron %s in %s%s" % (json.dumps(self.cron.text), self.zone_name,
                                        " (local time)" if self.local else "")
        return "every %gs" % self.every


def parse_schedules(table, cfg: "Config") -> dict[str, Schedule]:
    """The `schedules` config value (a table of [schedules.NAME] tables) -> {name: Schedule}.
    The job keys are checked as an `add` of that job would be (cfg: allow list, defaults).
    Raises ConfigError naming the schedule and the key. That `queue` is declared is not
    checked here."""
    import zoneinfo
    if not isinstance(table, dict):
        raise ConfigError("config key schedules: must be a table of [schedules.NAME] tables")
    local = None
    schedules = {}
    for name, spec in table.items():
        where = "schedule %s: " % name

        def bad(key: str, what: str):
            return ConfigError("%s%s: %s" % (where, key, what))

        if not SCHEDULE_NAME_RE.match(name):
            raise ConfigError("schedule %r: name must be 1-64 of A-Z a-z 0-9 _ . -" % name)
        if not isinstance(spec, dict):
            raise ConfigError("%smust be a table [schedules.%s]" % (where, name))
        unknown = sorted(set(spec) - set(SCHEDULE_KEYS))
        if unknown:
            raise bad(unknown[0], "unknown key (known: %s)" % ", ".join(SCHEDULE_KEYS))
        if "target" not in spec:
            raise bad("target", "missing (the job to queue, 'package.module:Attr')")
        job = {key: spec[key] for key in SCHEDULE_JOB_KEYS if key in spec}
        if job.get("timeout") == 0 and not isinstance(job["timeout"], bool):
            job["timeout"] = None       # TOML has no null: 0 is "no limit", as at the top level
        for key in ("args", "kwargs"):
            try:
                json.dumps(job.get(key), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise bad(key, "must hold JSON values only (%s)" % exc) from None
        try:
            validate_add(job, cfg, 0.0)
        except ProtocolError as exc:      # its message starts with the key's name
            raise ConfigError(where + exc.message) from None
        queue = spec.get("queue", "default")
        if not isinstance(queue, str) or not SCHEDULE_NAME_RE.match(queue):
            raise bad("queue", "must be a queue name, 1-64 of A-Z a-z 0-9 _ . - (got %r)"
                      % (queue,))
        if ("cron" in spec) == ("every" in spec):
            raise bad("cron", "give exactly one of cron and every")
        cron = every = None
        if "cron" in spec:
            try:
                cron = CronExpr(spec["cron"])
            except ValueError as exc:
                raise bad("cron", str(exc)) from None
        else:
            every = spec["every"]
            if not isinstance(every, (int, float)) or isinstance(every, bool) \
                    or not MIN_EVERY <= every <= MAX_DELAY:
                raise bad("every", "must be a number of seconds from %g to %g (got %r)"
                          % (MIN_EVERY, MAX_DELAY, every))
            every = float(every)
        if "timezone" in spec:
            zone_name = spec["timezone"]
            try:
                if not isinstance(zone_name, str):
                    raise ValueError
                zone = zoneinfo.ZoneInfo(zone_name)
            except (ValueError, zoneinfo.ZoneInfoNotFoundError):
                raise bad("timezone", "unknown time zone %r (an IANA name such as "
                          "\"Europe/Berlin\")" % (zone_name,)) from None
        else:
            local = local or local_zone()
            zone_name, zone = local
        missed = spec.get("missed", "once")
        if missed not in ("once", "skip"):
            raise bad("missed", "must be \"once\" or \"skip\" (got %r)" % (missed,))
        overlap = spec.get("overlap", False)
        if not isinstance(overlap, bool):
            raise bad("overlap", "must be true or false (got %r)" % (overlap,))
        schedules[name] = Schedule(name, cron, every, zone, zone_name, "timezone" not in spec,
                                   missed, overlap, queue, job)
    return schedules


####################################################################################################
#  Config
####################################################################################################

def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# key -> (default, kind). Kinds are checked by Config.check(); paths are resolved against the
# config file's directory, or without one against the directory of the real jobrunnerd.py.
CONFIG_KEYS: dict[str, tuple] = {
    "socket": ("storage/jobrunnerd.sock", "path"),
    "socket_mode": (0o600, "mode"),
    "allowed_uids": ([], "ids"),
    "allowed_gids": ([], "ids"),
    "state_dir": ("storage/state", "path"),
    "log_dir": ("storage/logs", "path"),
    "workers": (None, "count"),                 # None: the number of CPUs we may run on
    "isolation": ("fresh", "isolation"),        # the default queue's (SPEC §2d)
    "max_jobs_per_worker": (1000, "count"),     # the default queue's (used by "reuse")
    "queues": ({}, "queues"),                   # [queues.NAME] tables (SPEC §2a)
    "job_paths": (["."], "paths"),
    "allow": (["examples.*:*"], "patterns"),
    "retries": (0, "retries"),
    "retry_delay": (1.0, "seconds"),
    "backoff": ("exponential", ("fixed", "exponential")),
    "max_retry_delay": (3600.0, "seconds"),
    "timeout": (3600.0, "seconds"),             # 0: no limit
    "kill_grace": (5.0, "seconds"),
    "shutdown_grace": (30.0, "seconds"),
    "fsync": ("always", ("always", "never")),
    "max_request_bytes": (1048576, "count"),
    "max_connections": (256, "count"),
    "idle_timeout": (600.0, "seconds"),        # 0: never
    "max_reply_buffer": (67108864, "count"),
    "max_queued": (1000000, "count"),
    "keep_finished": (604800.0, "seconds"),
    "max_output_bytes": (1048576, "size"),
    "limits": ({}, "limits"),
    "start_method": ("zygote", ("zygote", "spawn")),
    "preload": ([], "modules"),
    "metrics_listen": ("", "listen"),           # "HOST:PORT": GET /metrics there; "" is off
    "schedules": ({}, "schedules"),             # checked by parse_schedules(): needs the rest
}
LIMIT_KEYS = ("cpu", "memory", "nofile", "fsize")
# A [queues.NAME] table: its own keys, then the job defaults it may set (the top level's
# otherwise). Slots: 1 unless given (a queue is declared to run something; 0 holds it).
QUEUE_KEYS = ("workers", "isolation", "max_jobs_per_worker", "priority", "retries",
              "retry_delay", "backoff", "timeout")
QUEUE_DEFAULTS = {"workers": 1, "isolation": "fresh", "max_jobs_per_worker": 1000}
MAX_QUEUE_WORKERS = 10000                 # more slots than this is a typo, not a host


class Config:
    """Every key of CONFIG_KEYS as an attribute, checked, with paths made absolute."""

    def __init__(self, values: dict, base_dir: str, path: str | None = None):
        self.path = path
        self.base_dir = base_dir
        for key, (default, _) in CONFIG_KEYS.items():
            value = values.get(key, default)
            setattr(self, key, self.check(key, value, base_dir))
        if self.workers is None:
            self.workers = _cpu_count()
        self.schedules = parse_schedules(self.schedules, self)     # {name: Schedule}
        for name, schedule in self.schedules.items():
            if schedule.queue != DEFAULT_QUEUE and schedule.queue not in self.queues:
                raise ConfigError("schedule %s: queue: %r is not declared in the config "
                                  "([queues.%s])" % (name, schedule.queue, schedule.queue))

    @staticmethod
    def check(key: str, value, base_dir: str, kind=None, label: str | None = None):
        kind = kind or CONFIG_KEYS[key][1]

        def bad(what: str):
            return ConfigError("config key %s: %s (got %r)" % (label or key, what, value))

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if value is None and key == "workers" and label is None:
            return None
        if kind == "isolation":
            if value not in ("fresh", "reuse"):
                raise bad('must be "fresh" or "reuse"')
            return value
        if kind == "queues":
            return Config.check_queues(value, base_dir, bad)
        if kind == "slots":
            if not is_int(value) or not 0 <= value <= MAX_QUEUE_WORKERS:
                raise bad("must be a whole number from 0 to %d" % MAX_QUEUE_WORKERS)
            return value
        if kind == "priority":
            if not is_int(value) or not -MAX_PRIORITY <= value <= MAX_PRIORITY:
                raise bad("must be a whole number from %d to %d" % (-MAX_PRIORITY, MAX_PRIORITY))
            return value
        if isinstance(kind, tuple):
            if value not in kind:
                raise bad("must be one of " + ", ".join(kind))
            return value
        if kind == "path":
            if not isinstance(value, str) or not value:
                raise bad("must be a path")
            return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
        if kind == "paths":
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise bad("must be a list of paths")
            return [os.path.normpath(os.path.join(base_dir, os.path.expanduser(v))) for v in value]
        if kind in ("patterns", "modules"):
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise bad("must be a list of strings")
            return list(value)
        if kind == "mode":
            if isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3,4}", value):
                value = int(value.replace("o", ""), 8)
            if not is_int(value) or not 0 <= value <= 0o777:
                raise bad("must be a file mode like 0o660")
            return value
        if kind == "ids":
            if not isinstance(value, list) or not all(is_int(v) and v >= 0 for v in value):
                raise bad("must be a list of numeric ids")
            return list(value)
        if kind == "count":
            if not is_int(value) or value < 1:
                raise bad("must be a whole number >= 1")
            return value
        if kind == "size":
            if not is_int(value) or value < 0:
                raise bad("must be a whole number of bytes >= 0")
            return value
        if kind == "retries":
            if not is_int(value) or not 0 <= value <= MAX_RETRIES:
                raise bad("must be a whole number from 0 to %d" % MAX_RETRIES)
            return value
        if kind == "seconds":
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not 0 <= value <= MAX_DELAY:
                raise bad("must be a number of seconds >= 0")
            return float(value)
        if kind == "listen":
            if not isinstance(value, str):
                raise bad('must be "HOST:PORT" or ""')
            if value:
                try:
                    split_listen(value)
                except ValueError as exc:
                    raise bad(str(exc)) from None
            return value
        if kind == "schedules":
            if not isinstance(value, dict):
                raise bad("must be a table of [schedules.NAME] tables")
            return value
        if kind == "limits":
            if not isinstance(value, dict):
                raise bad("must be a table such as {cpu = 60, memory = 1073741824}")
            for name, limit in value.items():
                if name not in LIMIT_KEYS:
                    raise bad("unknown limit %r (known: %s)" % (name, ", ".join(LIMIT_KEYS)))
                if not is_int(limit) or limit < 1:
                    raise bad("limit %s must be a whole number >= 1" % name)
            return dict(value)
        raise AssertionError(kind)


    @staticmethod
    def check_queues(value, base_dir: str, bad) -> dict:
        """The [queues.NAME] tables: name -> {key: value}, each key checked, the queue's own
        keys filled in (QUEUE_DEFAULTS); job defaults only where given."""
        if not isinstance(value, dict):
            raise bad("must be [queues.NAME] tables")
        queues = {}
        for name, table in value.items():
            if not QUEUE_NAME.match(name):
                raise bad("queue name %r is not 1-64 of A-Z a-z 0-9 _ . -" % name)
            if name == DEFAULT_QUEUE:
                raise ConfigError("config [queues.default]: the default queue takes the top-level"
                                  " keys (workers, isolation, retries, ...); set them there")
            if not isinstance(table, dict):
                raise ConfigError("config queues.%s: must be a table of keys" % name)
            unknown = sorted(set(table) - set(QUEUE_KEYS))
            if unknown:
                raise ConfigError("config queues.%s: unknown key(s): %s (known: %s)"
                                  % (name, ", ".join(unknown), ", ".join(QUEUE_KEYS)))
            checked = dict(QUEUE_DEFAULTS)
            for key, item in table.items():
                kind = {"workers": "slots", "priority": "priority"}.get(key)
                checked[key] = Config.check(key, item, base_dir, kind,
                                            label="queues.%s.%s" % (name, key))
            queues[name] = checked
        return queues


def script_dir() -> str:
    return os.path.dirname(os.path.realpath(__file__))


def load_config(path: str | None, overrides: dict) -> Config:
    """The config file (TOML) if any, then command-line overrides on top."""
    values: dict = {}
    base = script_dir()
    if path:
        import tomllib
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except OSError as exc:
            raise ConfigError("cannot read config %s: %s" % (path, exc.strerror)) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config %s: %s" % (path, exc)) from None
        base = os.path.dirname(os.path.abspath(path))
        unknown = sorted(set(values) - set(CONFIG_KEYS))
        if unknown:
            raise ConfigError("config %s: unknown key(s): %s" % (path, ", ".join(unknown)))
    cfg = Config(values, base, path)
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, Config.check(key, value, os.getcwd()))
    return cfg


####################################################################################################
#  Daemon: connections, the loop, signals, systemd
####################################################################################################

FDS_PER_WORKER = 8      # an attempt's output pipe, channel, output file, and their copies on
                        # the way to the zygote
FDS_OWN = 64            # the daemon's own: store, logs, listener, signal pipe, zygote, imports


def fds_needed(cfg: Config) -> int:
    return cfg.max_connections + FDS_PER_WORKER * cfg.workers + FDS_OWN


def fd_limit_problem(cfg: Config) -> str | None:
    """Why the config's connections and workers cannot all have their file descriptors under
    the hard RLIMIT_NOFILE, or None when they can."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= fds_needed(cfg):
        return None
    return ("max_connections = %d and workers = %d need about %d file descriptors, more than "
            "the hard limit of %d (ulimit -Hn, LimitNOFILE=): raise it, or lower them"
            % (cfg.max_connections, cfg.workers, fds_needed(cfg), hard))


def raise_fd_limit(cfg: Config) -> None:
    """Raise the soft RLIMIT_NOFILE (often 1024) to what the config needs, as far as the hard
    limit allows: a start or an accept that finds no free fd only waits, but it waits."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = fds_needed(cfg) if hard == resource.RLIM_INFINITY else min(fds_needed(cfg), hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            warn("warning: cannot raise the file descriptor limit to %d: %s" % (want, exc))
    problem = fd_limit_problem(cfg)
    if problem:
        warn("warning: " + problem)


def make_dirs(path: str, mode: int) -> None:
    """mkdir -p where every directory made (not only the last, as os.makedirs) has `mode`."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass


def check_dir(what: str, path: str, st: os.stat_result) -> None:
    """Refuse (StateError) a directory that a user other than ours or root may write to
    (SPEC §3a): they could plant files or links in it. Group or others' write permission is
    refused whoever is in the group, and so is an owner that is neither us nor root."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()):
        raise StateError("%s %s (mode %04o) is owned by uid %d, not by root or the daemon's "
                         "own uid %d; refusing to start" % (what, path, mode, st.st_uid,
                                                            os.geteuid()))
    if mode & 0o022:
        raise StateError("%s %s has mode %04o: writable by group or others, who could plant "
                         "files or links in it; refusing to start (chmod go-w %s)"
                         % (what, path, mode, path))


def sd_notify(message: str) -> None:
    """Send a state line to systemd ($NOTIFY_SOCKET, "@" = abstract namespace); no-op outside."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            # Never wait: a reader that does not read (its queue holds ~10 datagrams) must not
            # stop the loop. A dropped ping is harmless, the next comes in half an interval.
            s.sendto(message.encode(), socket.MSG_DONTWAIT, addr)
    except BlockingIOError:
        if message != "WATCHDOG=1":
            warn("sd_notify: the notify socket is full; dropped %r" % message)
    except OSError as exc:
        warn("sd_notify: %s" % exc)


def keep_big_blocks_apart() -> None:
    """Pin glibc's mmap threshold. By default it rises to the size of each mmap'ed block
    freed, so after the first big reply, replies (built, sent, freed) and the unsent tails
    of slow clients (kept) share the heap, and the holes freed between kept buffers stay
    resident: 50 clients that do not read held 9 MiB of replies in 17.5 MiB of RSS, and
    kept most of it after they left. Blocks from mmap go back to the system when freed."""
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD)      # -3: M_MMAP_THRESHOLD (malloc.h)
    except (ImportError, OSError, AttributeError):
        pass                    # not glibc: its allocator, its rules


class Connection:
    """One client. Replies are slots in request order; a slot is [None] until its reply exists
    (a `wait` fills it later), and only the filled prefix is sent."""

    __slots__ = ("sock", "fd", "uid", "inbuf", "outbuf", "slots", "eof", "closed", "last_input",
                 "on_event", "last_active", "counted")

    def __init__(self, sock: socket.socket, uid: int):
        self.on_event = None        # the loop callback: one object, so re-watching is free
        self.sock = sock
        self.fd = sock.fileno()
        self.uid = uid
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.slots: list[list] = []
        self.eof = False            # the client will send nothing more (or must not)
        self.closed = False
        self.last_input = time.monotonic()
        self.last_active = self.last_input  # a request or a reply moved: idle_timeout counts on
        self.counted = 0            # len(outbuf) as counted in Connections.reply_bytes

    def waiting(self) -> bool:
        """A `wait` is pending: later requests wait for it, as if the server were sequential."""
        return bool(self.slots) and self.slots[-1][0] is None


FIRE_RETRY = 1.0        # s before a fire whose journal write failed is tried again: no busy loop
                        # while the disk refuses (its nominal time stays what it was)
KEPT_KEYS = ("first_seen", "handled", "last_run_at", "last_job_id", "paused")


class Schedules:
    """Which schedule fires next, and what a fire does to the job table.

    For each schedule the config declares (`defs`, `declared`) or the state on disk remembers,
    `kept` holds what outlives a restart, as the snapshot's "schedules" and the journal's
    {"schedule": {"name": N, ...}} entries hold it:

        first_seen   when a daemon first saw it: nothing before is made up, and `every = N`
                     fires at first_seen + k*N
        handled      the latest nominal fire time dealt with (queued, skipped for overlap,
                     dropped while paused) or the moment of a resume: fires count from there
        last_run_at  nominal time of the last fire that queued a job, and that job's id
        last_job_id  (a fire's job carries `fire_at`: its one journal line is the fire and
                     these two at once, StoreLoading._fired)
        paused       no fires, and none made up

    `heap` holds (when, name, token) for each schedule that may fire: the loop sleeps until the
    first (due_in) and fire_due() handles what is due; an entry whose token is old is skipped.
    So 1,000 idle schedules cost one timer, never a scan. Callers: the daemon (load at
    start-up, configure on SIGHUP, due_in and fire_due each pass, meta for snapshots), the
    protocol (describe, trigger, set_paused). Every method takes `now`: tests step it. Changes
    made while the JobTable tracks a pass are undone with that pass (JobTable.undo)."""

    def __init__(self, table: JobTable, cfg: "Config"):
        self.table = table
        self.cfg = cfg                  # allow list and job defaults of each fire's `add`
        self.defs: dict[str, Schedule] = {}     # the last definition seen of each
        self.declared: set[str] = set()         # those the config declares now
        self.kept: dict[str, dict] = {}
        self.next: dict[str, float] = {}        # nominal next fire of each that may fire
        self.tokens: dict[str, int] = {}
        self.heap: list[tuple[float, str, int]] = []
        self._undo: dict[str, dict] | None = None
        table.schedules = self

    # -- configuration -----------------------------------------------------------------------

    def load(self, meta: dict, defs: dict[str, Schedule], now: float) -> None:
        """At start-up: what the state on disk keeps, then the config's schedules; a fire
        missed while the daemon was down is queued once (`missed = "once"`, nominal time the
        latest missed) or dropped (`"skip"`); either way the next fire is the next after now."""
        for name, kept in meta.get("schedules", {}).items():
            self.kept[name] = {key: kept[key] for key in KEPT_KEYS if key in kept}
        self.configure(defs, now, start_up=True)

    def configure(self, defs: dict[str, Schedule], now: float, start_up: bool = False) -> None:
        """Apply the config's schedules (start-up, SIGHUP). One seen for the first time counts
        from `now`; one declared again after a SIGHUP had removed it counts from `now` (fires
        while undeclared are not made up); one that stays keeps its state, and a changed
        definition counts from `now` rather than making up its own past; a removed one stops
        firing and stays known (`declared: false`)."""
        before = self.declared
        self.defs.update(defs)
        self.declared = set(defs)
        for name in sorted(defs):
            kept = self.kept.get(name)
            if kept is None or "first_seen" not in kept:
                kept = self.kept.setdefault(name, {})
                kept["first_seen"] = kept.get("handled", now)
                kept.setdefault("handled", now)
                self._journal(name, first_seen=kept["first_seen"], handled=kept["handled"])
            elif kept.get("paused"):
                pass
            elif start_up:
                missed = defs[name].latest_fire(kept["handled"], now, kept["first_seen"])
                if missed is not None:
                    if defs[name].missed == "once":
                        self.fire(name, missed, now)
                    else:
                        kept["handled"] = missed
                        self._journal(name, handled=missed)
            elif name not in before or self.next.get(name, math.inf) > now:
                # Nothing of the old definition is due: the new one counts from now.
                kept["handled"] = max(kept["handled"], now)
        for name in self.kept:
            self.kept[name].setdefault("first_seen", now)
            self.kept[name].setdefault("handled", now)
        self.heap = []
        self.next = {}
        for name in self.kept:
            self.plan(name)

    def plan(self, name: str, not_before: float | None = None) -> None:
        """(Re)compute the next fire of `name` and put it on the heap, if it may fire."""
        token = self.tokens[name] = self.tokens.get(name, 0) + 1
        kept = self.kept[name]
        if name not in self.declared or kept.get("paused"):
            self.next.pop(name, None)
            return
        nominal = self.defs[name].next_fire(kept["handled"], kept["first_seen"])
        self.next[name] = nominal
        wake = nominal if not_before is None else max(nominal, not_before)
        heapq.heappush(self.heap, (wake, name, token))

    # -- the loop's questions ----------------------------------------------------------------

    def due_in(self, now: float) -> float | None:
        """Seconds until the next fire (0.0: one is due), None when none is planned."""
        heap, tokens = self.heap, self.tokens
        while heap and tokens.get(heap[0][1]) != heap[0][2]:
            heapq.heappop(heap)
        return max(heap[0][0] - now, 0.0) if heap else None

    def fire_due(self, now: float) -> int:
        """Handle every fire due at `now`: one per schedule, for its latest due time (a loop
        that fell behind does not queue a burst). Returns how many schedules fired."""
        heap, tokens = self.heap, self.tokens
        fired = 0
        while heap and heap[0][0] <= now:
            _, name, token = heapq.heappop(heap)
            if tokens.get(name) != token:
                continue                        # stale: replanned since
            schedule, kept = self.defs[name], self.kept[name]
            anchor = kept["first_seen"]
            nominal = schedule.next_fire(kept["handled"], anchor)
            if nominal > now:                   # woken early (a retry after a failed write)
                self.plan(name)
                continue
            if schedule.next_fire(nominal, anchor) <= now:
                nominal = schedule.latest_fire(nominal, now, anchor)
            self.fire(name, nominal, now)
            fired += 1
        return fired

    # -- what a fire does --------------------------------------------------------------------

    def fire(self, name: str, nominal: float, now: float) -> Job | None:
        """The fire of `name` for the nominal time `nominal`: an ordinary job (`schedule` =
        name, `fire_at` = nominal), or an `event=skipped` line while its previous job is live
        and it does not overlap (or when the job cannot be queued). Handled either way: never
        made up."""
        schedule, kept = self.defs[name], self.kept[name]
        self._save(name)
        kept["handled"] = max(kept["handled"], nominal)
        live = self.table.live_by_schedule.get(name)
        why = None
        if live and not schedule.overlap:
            why = {"reason": "overlap", "previous": max(live)}
        else:
            try:
                fields = validate_add(schedule.add_request(), self.cfg, now)
                if sum(self.table.counts[state] for state in LIVE) >= self.cfg.max_queued:
                    raise ProtocolError("queue_full", "max_queued=%d live jobs"
                                        % self.cfg.max_queued)
            except ProtocolError as exc:
                why = {"reason": exc.code, "error": exc.message}
        if why is not None:
            self.table.log.event("skipped", when=now, schedule=name,
                                 target=schedule.job["target"], **why, fire_at=nominal)
            self._journal(name, handled=kept["handled"])
            self.plan(name)
            return None
        fields["schedule"], fields["fire_at"] = name, nominal
        job = self.table.create(now, [fields])[0]       # its line carries the fire (fire_at)
        kept["last_run_at"], kept["last_job_id"] = nominal, job.id
        self.plan(name)
        return job

    def trigger(self, name: str, now: float, uid: int | None = None) -> tuple[int, bool]:
        """A run of `name` now, outside its fires (the next fire stays): (job id, True), or
        (the live job's id, False) while one is live and it does not overlap."""
        schedule = self.defs.get(name) if name in self.declared else None
        if schedule is None:
            raise ProtocolError("not_found", "no schedule %r is declared in the config" % name)
        live = self.table.live_by_schedule.get(name)
        if live and not schedule.overlap:
            return max(live), False
        fields = validate_add(schedule.add_request(), self.cfg, now)
        if sum(self.table.counts[state] for state in LIVE) >= self.cfg.max_queued:
            raise ProtocolError("queue_full", "max_queued=%d live jobs" % self.cfg.max_queued)
        fields["schedule"], fields["uid"] = name, uid
        return self.table.create(now, [fields])[0].id, True

    def set_paused(self, name: str, paused: bool, now: float) -> None:
        """Pause or resume one schedule (durable). Fires missed while paused are not made up:
        a resume counts from `now`."""
        kept = self.kept.get(name)
        if kept is None:
            raise ProtocolError("not_found", "no schedule %r" % name)
        if bool(kept.get("paused")) == paused:
            return
        self._save(name)
        kept["paused"] = paused
        if paused:
            self._journal(name, paused=True)
        else:
            kept["handled"] = max(kept["handled"], now)
            self._journal(name, paused=False, handled=kept["handled"])
        self.plan(name)

    def _journal(self, name: str, **changes) -> None:
        self.table.store.append({"schedule": {"name": name, **changes}})

    # -- questions ---------------------------------------------------------------------------

    def describe(self) -> list[dict]:
        """What the `schedules` op says: one object per schedule, by name."""
        out = []
        for name in sorted(self.kept):
            kept, schedule = self.kept[name], self.defs.get(name)
            item = {"name": name}
            if schedule is not None:
                if schedule.cron is not None:
                    item["cron"] = schedule.cron.text
                else:
                    item["every"] = schedule.every
            item.update({
                "timezone": schedule.zone_name if schedule else None,
                "target": schedule.job["target"] if schedule else None,
                "queue": schedule.queue if schedule else None,
                "paused": bool(kept.get("paused")), "declared": name in self.declared,
                "next_run_at": self.next.get(name), "last_run_at": kept.get("last_run_at"),
                "last_job_id": kept.get("last_job_id")})
            job = self.table.jobs.get(item["last_job_id"])
            item["last_job_state"] = job.state if job is not None else None
            out.append(item)
        return out

    def meta(self) -> dict:
        """What a snapshot keeps of the schedules."""
        return {name: dict(kept) for name, kept in self.kept.items()}

    # -- undo (a failed journal write) -------------------------------------------------------

    def track(self) -> None:
        self._undo = {}

    def untrack(self) -> None:
        self._undo = None

    def _save(self, name: str) -> None:
        if self._undo is not None and name not in self._undo:
            self._undo[name] = dict(self.kept[name])

    def undo(self) -> None:
        """Put back every schedule changed since track(); their fires are tried again
        FIRE_RETRY later, for the same nominal times."""
        if not self._undo:
            return
        retry = self.table.clock() + FIRE_RETRY
        for name, saved in self._undo.items():
            self.kept[name] = saved
            self.plan(name, not_before=retry)
        self._undo = {}


class PruneTask:
    """A prune under way: removes finished jobs up to `cutoff` in steps (Pruner.prune_some);
    `slot` is the reply of the request that asked for it (None: the automatic prune)."""

    __slots__ = ("cutoff", "slot", "conn", "removed", "exhausted", "outputs")

    def __init__(self, cutoff: float, slot: list | None = None, conn: Connection | None = None):
        self.cutoff = cutoff
        self.slot = slot
        self.conn = conn
        self.removed = 0
        self.exhausted = False              # every job it is to remove is removed
        self.outputs: collections.deque[int] = collections.deque()  # ids: their files go

    def answer(self, this_pass: "Pass", reply: bytes) -> None:
        self.slot[0] = reply
        this_pass.answered(self.conn)


class Pruner:
    """Removing finished jobs whose processes are gone: the automatic prune (keep_finished, every
    PRUNE_INTERVAL) and `prune` requests, each a PruneTask done in durable steps, oldest first
    (prune_some, once per pass); the output files of removed jobs go once that is durable."""

    def __init__(self, cfg: "Config", clock, loop: Loop, runner: "Runner",
                 attempts: dict[int, Attempt], this_pass: "Pass"):
        self.jobs: JobTable | None = None          # the table, once Daemon.setup() loaded it
        self.cfg = cfg                             # keep_finished
        self.clock = clock
        self.loop = loop
        self.runner = runner                       # where the output files are
        self.attempts = attempts                   # job id -> its running attempt (not pruned)
        self.this_pass = this_pass
        self.prunes: collections.deque[PruneTask] = collections.deque()   # under way, oldest first

    def auto_prune(self) -> None:
        self.loop.call_later(PRUNE_INTERVAL, self.auto_prune)
        if not any(task.slot is None for task in self.prunes):
            self.prunes.append(PruneTask(self.clock() - self.cfg.keep_finished))

    def prune(self, cutoff: float, limit: int | None = None) -> list[Job]:
        """Remove (at most `limit` of) the jobs finished at or before `cutoff` whose processes
        are gone. One `del` entry in the journal; a fold follows when prunes have deleted
        enough of the snapshot (Store.wants_compaction)."""
        old = self.jobs.finished_before(cutoff, busy=self.attempts, limit=limit)
        if old:
            self.jobs.remove(old)
        return old

    def prune_some(self, budget: int | None) -> None:
        """The next step of the prunes under way, oldest first: at most `budget` jobs removed
        this pass (None: all), and for at most PRUNE_OUTPUT_SECONDS the output files of jobs
        whose removal is durable (an unlink costs up to ~0.1 ms: 100k of them are seconds).
        A request is answered after its last step, its files gone (a crash before leaves a
        prefix done, as `cancel` with `where`)."""
        deadline = None if budget is None else time.monotonic() + PRUNE_OUTPUT_SECONDS
        while self.prunes and (budget is None or budget > 0):
            task = self.prunes[0]
            if task.slot is not None and task.slot[0] is not None:
                self.prunes.popleft()           # answered already: a step's write failed
                continue
            while task.outputs and (deadline is None or time.monotonic() < deadline):
                self.remove_output(task.outputs.popleft())
            if task.outputs:
                return                          # more next pass
            if not task.exhausted:
                old = self.prune(task.cutoff, budget)
                task.removed += len(old)
                if task.slot is not None:
                    self.this_pass.batch_slots.append(task.slot)  # this step's reply waits
                if old:                         # their files go once this step is durable
                    self.this_pass.after_commit.append(
                        lambda task=task, ids=[j.id for j in old]: task.outputs.extend(ids))
                if budget is not None and len(old) >= budget:
                    return                      # more next pass
                task.exhausted = True
                if old:
                    return
            if task.slot is not None:
                task.answer(self.this_pass, encode_reply({"removed": task.removed}))
            self.prunes.popleft()

    def remove_output(self, job_id: int) -> None:
        try:
            os.unlink("%d.log" % job_id, dir_fd=self.runner.output_dir_fd())
        except FileNotFoundError:
            pass
        except OSError as exc:
            warn("cannot remove output of job %d: %s" % (job_id, exc))

    def write_failed(self, exc: OSError) -> None:
        """This pass's commit failed: a prune under way stops here (its steps so far are done):
        an auto-prune tries again in a minute, a request is answered (its slot may be this
        pass's too, with its io_error already)."""
        for task in self.prunes:
            if task.slot is not None:
                task.answer(self.this_pass, task.slot[0] or encode_error(
                    "io_error", "the prune could not be made durable (%s) after %d jobs "
                    "were removed" % (exc.strerror or exc, task.removed)))
        self.prunes.clear()


class Pass:
    """What one loop pass gathers for its commit (Daemon.commit reads it): the changes of this
    pass's requests are written together, and the replies that report them go out only after
    the fsync. The lists are emptied by each commit; `unsynced_ends` lasts until the store has
    synced; `dirty` until flush() and `resume` until the next pass serves those clients."""

    __slots__ = ("batch_slots", "report_slots", "new_waiters", "after_commit", "starting",
                 "unsynced_ends", "dirty", "resume")

    def __init__(self):
        self.batch_slots: list[list] = []          # replies of this pass's changing requests
        self.report_slots: list[list] = []         # replies that report an end not yet durable
        self.new_waiters: list[tuple] = []         # (job id, entry) of waits begun this pass
        self.after_commit: list = []               # side effects of this pass's client requests
        self.starting: list[Attempt] = []          # started this pass: released after the write
        self.unsynced_ends: set[int] = set()       # jobs whose end is written, not yet durable
        self.dirty: set[Connection] = set()        # connections with replies to send
        self.resume: set[Connection] = set()       # a wait ended: serve what they sent after it

    def needs_sync(self, ended: list) -> bool:
        """Does a reply wait for this commit's fsync? (Other changes may wait SYNC_DELAY.)"""
        return bool(self.batch_slots or self.report_slots or ended)

    def answered(self, conn: Connection) -> None:
        """A reply held back (a wait, a pattern query, a prune) is filled: send it, and serve
        the requests conn sent after it."""
        self.dirty.add(conn)
        self.resume.add(conn)

    def written(self, ended: list[Job], waits: "Waiters") -> None:
        """The commit is durable: its side effects run and the waits for jobs that ended in
        it are answered."""
        for action in self.after_commit:
            action()
        self.after_commit.clear()
        for job in ended:
            if job.state in FINISHED:
                waits.resolve(job)

    def write_failed(self, exc: OSError, ended: list[Job], jobs: JobTable,
                     waits: "Waiters") -> None:
        """The commit's write failed and its changes are undone: no side effect of them runs,
        and every reply that would report a change (or wait on one) says io_error."""
        self.after_commit.clear()
        for slot in self.batch_slots:
            slot[0] = encode_error("io_error", "the change could not be made durable (%s); "
                                   "nothing was changed" % (exc.strerror or exc))
        # A job that ended (its process is gone: that is not undone) but whose end is not
        # on disk: a reply that it ended would be an acknowledgement without the fsync.
        not_durable = encode_error("io_error", "the job ended, but that could not be made "
                                   "durable yet (%s); ask again" % (exc.strerror or exc))
        for slot in self.report_slots:
            slot[0] = not_durable
        for job in ended:
            if job.state in FINISHED:
                waits.resolve(job, not_durable)
        # A wait that came after a change now undone (an add, a retry) would wait forever
        # for a job that is gone or finished again.
        undone = encode_error("io_error", "the change before this wait could not be made "
                              "durable (%s); nothing was changed" % (exc.strerror or exc))
        for job_id, entry in self.new_waiters:
            job = jobs.jobs.get(job_id)
            if job is None or job.state in FINISHED:
                waits.answer(job_id, entry, undone)

    def committed(self) -> None:
        """The commit is written (or undone): what it answered is answered."""
        self.batch_slots.clear()
        self.report_slots.clear()
        self.new_waiters.clear()


class Waiters:
    """The pending `wait` requests: job id -> [[conn, slot, timer]]. A wait is answered when its
    job ends (by the commit that made the end durable), at its timeout (Protocol.wait_expired),
    or when the daemon stops; a client that hangs up takes its waits with it."""

    def __init__(self, loop: Loop, this_pass: Pass):
        self.loop = loop
        self.this_pass = this_pass
        self.by_job: dict[int, list] = {}

    def __contains__(self, job_id: int) -> bool:
        return job_id in self.by_job

    def add(self, job_id: int, conn: Connection, slot: list, timeout: float | None,
            on_timeout) -> None:
        entry = [conn, slot, None]
        if timeout is not None:
            entry[2] = self.loop.call_later(timeout, on_timeout, job_id, entry)
        self.by_job.setdefault(job_id, []).append(entry)
        self.this_pass.new_waiters.append((job_id, entry))

    def resolve(self, job: Job, reply: bytes | None = None) -> None:
        """Answer the waits for `job`, which has ended: with its record, or with `reply`."""
        for conn, slot, timer in self.by_job.pop(job.id, ()):
            Loop.cancel(timer)
            slot[0] = reply or encode_reply({"job": job.record(), "done": True})
            self.this_pass.answered(conn)

    def answer(self, job_id: int, entry: list, reply: bytes) -> None:
        """Answer one wait for `job_id` with `reply`, before its job ends."""
        entries = self.by_job.get(job_id, [])
        if entry in entries:
            entries.remove(entry)
            if not entries:
                del self.by_job[job_id]
            Loop.cancel(entry[2])
            entry[1][0] = reply
            self.this_pass.answered(entry[0])

    def drop(self, conn: Connection) -> None:
        """conn is closed: nobody to answer, its waits end here, timers and all."""
        for job_id, entries in list(self.by_job.items()):
            kept = [entry for entry in entries if entry[0] is not conn]
            if len(kept) < len(entries):
                for entry in entries:
                    if entry[0] is conn:
                        Loop.cancel(entry[2])
                if kept:
                    self.by_job[job_id] = kept
                else:
                    del self.by_job[job_id]

    def end_all(self, reply: bytes) -> None:
        """The daemon stops: every wait is answered with `reply`."""
        for job_id, entries in list(self.by_job.items()):
            for conn, slot, timer in entries:
                Loop.cancel(timer)
                slot[0] = reply
                self.this_pass.dirty.add(conn)
        self.by_job.clear()


class Histogram:
    """One histogram of the metrics: observations counted per bucket (not yet cumulative),
    their sum and count. Buckets are METRIC_BUCKETS' upper bounds, then +Inf."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self):
        self.counts = [0] * (len(METRIC_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(METRIC_BUCKETS, value)] += 1
        self.sum += value
        self.count += 1


def metric_escape(value: str) -> str:
    """A label value in the text format (0.0.4): backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metric_number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, int) or value == int(value) and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(float(value))


METRIC_LE = [metric_number(bound) for bound in (*METRIC_BUCKETS, math.inf)]   # le="..."


def attempt_metric_outcome(ending: Ending, out: Outcome, timed_out: bool) -> str:
    """SPEC §7: how an ended attempt counts in attempts_total: timed_out when its timeout
    ended it; else succeeded or interrupted as it ended; else retried when another attempt
    follows and failed when none does. (A cancelled attempt never reaches settle().)"""
    if timed_out:
        return "timed_out"
    if ending.how == ENDED_OK:
        return "succeeded"
    if ending.how in (ENDED_SHUTDOWN, ENDED_INTERRUPTED):
        return "interrupted"
    return "retried" if out.state == PENDING else "failed"


class Metrics:
    """The daemon's counters since it started, kept as things happen (never by walking the
    job table): attempts started (queue wait) and ended (outcome, run time), jobs enqueued,
    jobs finished per second over the last RATE_WINDOW, the latest failed attempts. render()
    makes the Prometheus text (SPEC §7) of these and of what the queues count already
    (jobs per state, running, workers). Callers: the Dispatcher (attempt_started, attempt_ended),
    the Protocol (enqueued, after the commit), the Daemon (finished, render)."""

    def __init__(self, clock):
        self.clock = clock
        self.attempts: dict[tuple[str, str], int] = {}     # (queue, outcome) -> count
        self.enqueued_by_queue: dict[str, int] = {}
        self.durations: dict[str, Histogram] = {}          # queue -> attempt run time
        self.waits: dict[str, Histogram] = {}              # queue -> run_at to start
        self.failures: collections.deque[dict] = collections.deque(maxlen=LATEST_FAILURES)
        self.ring = [[0, 0] for _ in range(RATE_WINDOW)]    # [second, jobs finished in it]

    def attempt_started(self, job: Job, started_at: float) -> None:
        """An attempt of `job` starts at `started_at`: how long it waited past its run_at."""
        waits = self.waits.get(job.queue) or self.waits.setdefault(job.queue, Histogram())
        waits.observe(max(0.0, started_at - (job.run_at or started_at)))

    def attempt_ended(self, job: Job, outcome: str, duration: float | None,
                      error: str | None = None) -> None:
        """An attempt of `job` ended as `outcome` (OUTCOMES) after `duration` seconds (None:
        unknown, an attempt a dead daemon left running)."""
        key = (job.queue, outcome)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        if duration is not None:
            hist = self.durations.get(job.queue) or self.durations.setdefault(job.queue,
                                                                              Histogram())
            hist.observe(max(0.0, duration))
        if outcome in ("failed", "retried", "timed_out"):
            self.failures.append({"id": job.id, "queue": job.queue, "target": job.target,
                                  "outcome": outcome, "error": error, "at": self.clock()})

    def enqueued(self, jobs: list) -> None:
        """Jobs added (add, add_batch, a schedule's fire) or put back by `retry`, written."""
        counts = self.enqueued_by_queue
        for job in jobs:
            counts[job.queue] = counts.get(job.queue, 0) + 1

    def finished(self, n: int) -> None:
        """`n` jobs reached a finished state (their end is written)."""
        if n:
            second = int(self.clock())
            cell = self.ring[second % RATE_WINDOW]
            if cell[0] != second:
                cell[0], cell[1] = second, 0
            cell[1] += n

    def finished_last_minute(self) -> int:
        """Jobs finished in the last RATE_WINDOW seconds (this one included)."""
        now = int(self.clock())
        return sum(n for second, n in self.ring if now - RATE_WINDOW < second <= now)

    def render(self, queues: list, uptime: float, journal_bytes: int,
               schedules: list[tuple[str, float | None]]) -> str:
        """The text exposition format 0.0.4 of every family: `queues` are the Queue objects
        (counts per state, running, workers), `schedules` (name, next fire) pairs. Its cost
        is per queue (~60 samples each), never per job."""
        out: list[str] = []
        add = out.append
        by_name = {q.name: q for q in queues}
        names = sorted(set(by_name) | {q for q, _ in self.attempts}
                       | set(self.enqueued_by_queue) | set(self.durations) | set(self.waits))
        label = {name: 'queue="%s"' % metric_escape(name) for name in names}
        none = Queue("", 0)                     # a queue only the counters know of

        def family(name: str, kind: str, text: str) -> None:
            add("# HELP %s %s\n# TYPE %s %s\n" % (name, text, name, kind))

        family("jobrunner_jobs", "gauge", "Jobs now in each state, per queue.")
        for name in names:
            counts = by_name.get(name, none).counts
            for state in STATES:
                add('jobrunner_jobs{%s,state="%s"} %d\n' % (label[name], state, counts[state]))
        family("jobrunner_running", "gauge", "Attempts holding a worker slot, per queue.")
        for name in names:
            add("jobrunner_running{%s} %d\n" % (label[name], by_name.get(name, none).running))
        family("jobrunner_workers", "gauge", "Worker slots, per queue.")
        for name in names:
            add("jobrunner_workers{%s} %d\n" % (label[name], by_name.get(name, none).workers))
        family("jobrunner_attempts_total", "counter",
               "Attempts ended since the daemon started, per queue and outcome.")
        attempts = self.attempts
        for name in names:
            for outcome in OUTCOMES:
                add('jobrunner_attempts_total{%s,outcome="%s"} %d\n'
                    % (label[name], outcome, attempts.get((name, outcome), 0)))
        family("jobrunner_enqueued_total", "counter",
               "Jobs added (add, add_batch, schedule fires, retry) since the daemon started.")
        for name in names:
            add("jobrunner_enqueued_total{%s} %d\n"
                % (label[name], self.enqueued_by_queue.get(name, 0)))
        bounds = METRIC_LE
        for metric, hists, text in (
                ("jobrunner_attempt_duration_seconds", self.durations,
                 "Run time of ended attempts, per queue."),
                ("jobrunner_queue_wait_seconds", self.waits,
                 "Time from a job's run_at to the start of its attempt, per queue.")):
            family(metric, "histogram", text)
            for name in names:
                hist = hists.get(name) or Histogram()
                total = 0
                for le, n in zip(bounds, hist.counts):
                    total += n
                    add('%s_bucket{%s,le="%s"} %d\n' % (metric, label[name], le, total))
                add("%s_sum{%s} %s\n" % (metric, label[name], metric_number(hist.sum)))
                add("%s_count{%s} %d\n" % (metric, label[name], hist.count))
        family("jobrunner_schedule_next_run_timestamp_seconds", "gauge",
               "Next fire time of each schedule (Unix epoch seconds).")
        for name, next_run in schedules:
            if next_run is not None:
                add('jobrunner_schedule_next_run_timestamp_seconds{schedule="%s"} %s\n'
                    % (metric_escape(name), metric_number(next_run)))
        family("jobrunner_uptime_seconds", "gauge", "Seconds since the daemon started.")
        add("jobrunner_uptime_seconds %s\n" % metric_number(uptime))
        family("jobrunner_journal_bytes", "gauge",
               "Bytes of journal not yet folded into the snapshot.")
        add("jobrunner_journal_bytes %d\n" % journal_bytes)
        return "".join(out)


class Dispatcher:
    """The attempts of jobs: starts due jobs while a slot is free (the Scheduler says which),
    hears from the Runner when an attempt's process exists, could not be made, or has ended,
    and makes of each ended attempt what attempt_outcome() says; at start-up, the attempts a
    dead daemon left running. `jobs` and `log` are set once the state is loaded; `started`
    hands an attempt whose start is written to the pass (its job spec goes once that is
    durable), `fd_freed` says that an attempt let go of its fds."""

    def __init__(self, cfg: Config, scheduler: Scheduler, clock, started, fd_freed):
        self.cfg = cfg
        self.scheduler = scheduler
        self.clock = clock
        self.started = started
        self.fd_freed = fd_freed
        self.jobs: JobTable | None = None
        self.log: EventLog | None = None
        self.runner: Runner | None = None
        self.metrics = Metrics(clock)              # attempts counted as they start and end
        self.attempts: dict[int, Attempt] = {}     # job id -> its running attempt
        self.held: dict[int, Job] = {}             # due, but their last attempt is still dying
        self.slots: dict[int, Queue] = {}          # attempt token -> the queue whose slot it holds
        self.stopping = False                      # the daemon is stopping: start nothing
        self.start_retry_at = 0.0                  # no start before (a host failure's backoff)
        self.ending: Attempt | None = None         # the attempt attempt_ended() is ending
        self.start_warned_at = -START_WARN_INTERVAL

    def next_start_in(self) -> float | None:
        """Seconds until an attempt may start (0.0: now), or None: no slot, paused, nothing
        pending. A start that failed for a reason of the host waits for its backoff."""
        due = self.scheduler.due_in(self.clock())
        if due is None:
            return None
        backoff = self.start_retry_at - time.monotonic()
        if backoff > 0:                 # a start failed for a reason of the host
            return backoff
        return due

    def recover_running(self, changed: bool = True) -> None:
        """Jobs left `running` by a daemon that died: kill what is left of them, then count the
        attempt as failed (pending again, or failed when no retries are left). First, when
        the journal holds changes (`changed`: no graceful stop wrote a snapshot after them),
        what attempts that had ended left, if the dead daemon had not swept it yet."""
        if changed and self.jobs.jobs:
            self.kill_leftovers(lambda: find_ended_leftovers(self.attempt_over))
        if not self.jobs.counts[RUNNING]:
            return
        now = self.clock()
        running = [j for j in self.jobs.jobs.values() if j.state == RUNNING]
        groups = set()
        for job in running:
            if job.pid:
                start = proc_start_time(job.pid)
                if start is None or start == job.pid_start:   # gone, or still ours: kill
                    kill_group(job.pid, signal.SIGKILL)
                    groups.add(job.pid)
        # SIGKILL is not instant for a process in uninterruptible sleep: the next attempt must
        # not overlap the old one, so wait (bounded) until no live member of a group is left.
        deadline = time.monotonic() + self.cfg.kill_grace
        while groups and time.monotonic() < deadline:
            groups &= live_process_groups()
            if groups:
                time.sleep(0.01)
        for pgid in groups:
            warn("warning: process group %d survived SIGKILL for %gs"
                 % (pgid, self.cfg.kill_grace))
        attempts = {(job.id, job.attempts): job.pid_start for job in running
                    if job.pid_start is not None}
        if attempts:
            self.kill_leftovers(lambda: find_leftovers(attempts))
        for job in running:
            self.settle(job, Ending(ENDED_INTERRUPTED), now, pid=job.pid)

    def attempt_over(self, mark: tuple[int, int], born: float) -> bool:
        """Is the attempt (job id, number) a process carries over, the process born after its
        job was made (not another daemon's job of the same id)? At start-up, before any
        attempt starts: every attempt but a `running` job's current one is."""
        job = self.jobs.jobs.get(mark[0])
        return job is not None and 1 <= mark[1] <= job.attempts + 1 \
            and born >= job.created_at - 1.0 \
            and not (job.state == RUNNING and mark[1] == job.attempts)

    def kill_leftovers(self, find) -> None:
        """What attempts started and the crash let go (re-parented to init: setsid, a
        daemonising tool), as find() lists it: killed before the jobs can run again. A victim's
        own children go to init as it dies, so look again until nothing is found."""
        deadline = time.monotonic() + self.cfg.kill_grace
        while True:
            left = find()
            for pid, start in left:
                kill_process(pid, start)
            if not left:
                return
            if time.monotonic() >= deadline:
                warn("warning: %d processes of ended jobs survived SIGKILL for %gs"
                     % (len(left), self.cfg.kill_grace))
                return
            time.sleep(0.01)

    def dispatch(self) -> None:
        """Start due jobs while workers are free, each in a slot of its own queue."""
        if self.stopping or time.monotonic() < self.start_retry_at:
            return
        now = self.clock()
        while True:
            job = self.scheduler.next_job(now)
            if job is None:
                return
            if job.id in self.attempts:     # retried while its cancelled attempt was stopping
                self.held[job.id] = job
                continue
            queue = self.scheduler.queue(job.queue)
            try:
                att = self.attempts[job.id] = self.runner.start(job, job.attempts + 1, queue)
            except OSError as exc:
                self.not_started(job, "could not start a job process: %s" % exc)
                return
            if att.token in self.runner.active:     # (not ended already)
                queue.running += 1
                self.slots[att.token] = queue

    def free_slot(self, att: Attempt) -> None:
        """The attempt left the runner (ended, or never started): its queue's slot is free."""
        queue = self.slots.pop(att.token, None)
        if queue is not None:
            queue.running -= 1

    def attempt_started(self, att: Attempt) -> None:
        """The runner's report: the process of `att` exists (its pid is known)."""
        job = att.job
        self.attempts[job.id] = att
        if job.state == PENDING:        # else it was cancelled meanwhile and is being stopped
            # when the daemon started it (its timeout counts from then), not its fork
            started_at = self.clock() - (time.monotonic() - att.started)
            self.metrics.attempt_started(job, started_at)
            self.jobs.transition(job, RUNNING, pid=att.pid, changes=attempt_running(
                att.number, att.pid, att.pid_start, started_at))
            self.started(att)           # runs the job once this pass's commit wrote that

    def attempt_start_failed(self, att: Attempt, error: str, retry_now: bool) -> None:
        """The runner's report: no process could be made for `att` (the zygote failed)."""
        self.free_slot(att)
        self.not_started(att.job, error, retry_now)

    def not_started(self, job: Job, error: str, retry_now: bool = False) -> None:
        """No process could be made for the job, for a reason of the host (no free fd, no
        memory to fork, the zygote gone or not answering): SPEC §2, that is no attempt. The job
        stays pending as it was and is started again shortly (at once when the runner now
        goes another way); the cause is logged once a minute at most."""
        self.attempts.pop(job.id, None)
        self.held.pop(job.id, None)
        if job.state == PENDING:        # else it was cancelled meanwhile
            self.jobs.requeue(job)
        now = time.monotonic()
        if not retry_now:
            self.start_retry_at = now + START_RETRY_DELAY
        if now >= self.start_warned_at + START_WARN_INTERVAL:
            self.start_warned_at = now
            warn("%s; job %d stays pending and is started again shortly" % (error, job.id))

    def attempt_ended(self, att: Attempt) -> None:
        """The runner's report: the process of `att` has exited."""
        self.ending = att                       # settle() writes its end line through it
        try:
            self._attempt_ended(att)
        finally:
            self.ending = None

    def _attempt_ended(self, att: Attempt) -> None:
        self.fd_freed()                         # its pipes are closed
        self.free_slot(att)
        job = att.job
        self.attempts.pop(job.id, None)
        if att.pid is None:                     # stopped before its process existed
            self.held.pop(job.id, None)
            if job.state == PENDING and att.stop_reason == "timeout":  # it counts (SPEC §2)
                self.jobs.transition(job, RUNNING, changes={"attempts": att.number})
                error = "timed out after %gs (its process had not started)" % job.timeout
                self.log.event("timed_out", job=job.id, target=job.target, **queue_field(job),
                               attempt=job.attempt_label())
                self.attempt_failed(job, None, error, error, permanent=False, timed_out=True)
            elif job.state == PENDING:          # shutdown, or retried while being cancelled
                self.jobs.requeue(job)
            return
        exit_code = os.waitstatus_to_exitcode(att.status)
        duration = time.monotonic() - att.started
        if job.state != RUNNING:                # cancelled while it ran (and maybe retried)
            if job.attempts == att.number:     # it had started (not cancelled before that)
                self.metrics.attempt_ended(job, "cancelled", duration)
            self.runner.note(job.id, "attempt %d/%d cancelled after %.2fs (%s)" % (
                att.number, job.retries + 1, duration, exit_reason(exit_code)), att)
            if job.state == CANCELLED:
                self.jobs.update(job, **no_process(exit_code=exit_code))
            if self.held.pop(job.id, None) is not None and job.state == PENDING:
                self.jobs.requeue(job)
            return
        report = att.report()
        if att.stop_reason == "shutdown":
            self.settle(job, Ending(ENDED_SHUTDOWN, exit_code), self.clock(), duration=duration,
                        pid=att.pid)
            return
        status = report.get("status") if report else None
        if exit_code == 0 and att.stop_reason is None and status in ("ok", None):
            self.settle(job, Ending(ENDED_OK, result=report.get("result") if report else None),
                        self.clock(), duration=duration, pid=att.pid)
            return
        if att.stop_reason == "timeout":
            error = "timed out after %gs" % job.timeout
            self.log.event("timed_out", job=job.id, target=job.target, **queue_field(job),
                           attempt=job.attempt_label(), duration=duration, pid=att.pid)
        elif status in ("error", "permanent", "invalid") and report.get("error"):
            error = str(report["error"])
        else:
            error = exit_reason(exit_code)
        detail = report.get("traceback") if report else None
        self.attempt_failed(job, exit_code, error, detail or error, permanent=status == "permanent",
                            timed_out=att.stop_reason == "timeout", duration=duration,
                            pid=att.pid)

    def attempt_failed(self, job: Job, exit_code: int | None, error: str, detail: str | None,
                       permanent: bool, timed_out: bool = False, **log_fields) -> None:
        """A failed attempt: retry later (the retry policy says when) or fail for good."""
        self.settle(job, Ending(ENDED_PERMANENT if permanent else ENDED_ERROR, exit_code, error,
                                detail), self.clock(), timed_out, **log_fields)

    def settle(self, job: Job, ending: Ending, now: float, timed_out: bool = False,
               **log_fields) -> None:
        """Apply what attempt_outcome() makes of the job's attempt that ended as `ending`
        (`timed_out`: its timeout ended it), and count it in the metrics."""
        out = attempt_outcome(job, ending, now, self.cfg.max_retry_delay)
        self.metrics.attempt_ended(job, attempt_metric_outcome(ending, out, timed_out),
                                   log_fields.get("duration"), out.changes.get("error"))
        att = self.ending if self.ending is not None and self.ending.job is job else None
        # An attempt that succeeded printing nothing adds its lines only to a file earlier
        # attempts made: most jobs print nothing, and a file each would cost the loop.
        self.runner.note(job.id, attempt_end_note(job, ending, out, log_fields.get("duration")),
                         att, create=ending.how != ENDED_OK)
        if out.announce is not None:
            self.log.event(out.announce, job=job.id, target=job.target, **queue_field(job),
                           attempt=job.attempt_label(), **log_fields)
        self.jobs.transition(job, out.state, event=out.event, detail=out.detail,
                             changes=out.changes, **{**out.fields, **log_fields})


class Daemon:
    """The daemon: owns the loop, the job table, the store and the runner, and wires them to
    the clients (Connections), the protocol (Protocol) and each pass's commit (Pass)."""

    def __init__(self, cfg: Config, clock=None):
        self.cfg = cfg
        self.clock = clock or wall_clock    # the wall clock, read nowhere else: tests step it
        self.loop = Loop()
        self.store = Store(cfg.state_dir, fsync=cfg.fsync == "always")
        self.log: EventLog | None = None
        self.jobs: JobTable | None = None
        self.schedules: Schedules | None = None
        self.scheduler = Scheduler(cfg.workers)
        self.scheduler.configure(cfg)
        self.this_pass = Pass()                    # what this loop pass commits and answers
        self.waits = Waiters(self.loop, self.this_pass)
        self.dispatcher = Dispatcher(cfg, self.scheduler, self.clock,
                                     self.this_pass.starting.append,
                                     lambda: self.connections.fd_freed())
        self.runner = Runner(cfg, self.loop, self.dispatcher.attempt_started,
                             self.dispatcher.attempt_ended, self.dispatcher.attempt_start_failed)
        self.dispatcher.runner = self.runner
        self.attempts = self.dispatcher.attempts   # job id -> its running attempt
        self.metrics = self.dispatcher.metrics
        self.stopping = False
        self.stop_reason: str | None = None         # what began the stop: a signal's name
        self.compact_wanted = False
        self.repair_after = 0.0
        self.started = self.clock()
        self.wake_r = self.wake_w = None
        self.bugs: set[tuple] = set()              # places whose internal error was reported
        self.journal_trouble = WriteTrouble()      # failed journal writes: said once, not each
        self.loop.on_error = self.internal_error
        self.pruner = Pruner(cfg, self.clock, self.loop, self.runner, self.attempts,
                             self.this_pass)
        self.protocol = Protocol(self)
        self.connections = Connections(cfg, self.loop, self.store, self.this_pass, self.waits,
                                       self.protocol)
        self.http: MetricsHTTP | None = None       # metrics_listen, once setup() opened it

    # The parts under the names they had when they were the daemon's own: the in-process
    # tests reach them so.
    conns = property(lambda self: self.connections.conns)
    listener = property(lambda self: self.connections.listener)
    on_client = property(lambda self: self.connections.on_client)
    gather = property(lambda self: self.connections.gather)
    flush = property(lambda self: self.connections.flush)
    close = property(lambda self: self.connections.close)
    handle_line = property(lambda self: self.protocol.handle_line)
    waiters = property(lambda self: self.waits.by_job)
    dirty = property(lambda self: self.this_pass.dirty)
    batch_slots = property(lambda self: self.this_pass.batch_slots)

    # -- start-up ----------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        raise_fd_limit(cfg)
        for path in (cfg.state_dir, cfg.log_dir, os.path.join(cfg.log_dir, "output")):
            make_dirs(path, 0o750)
        check_dir("state_dir", cfg.state_dir, os.stat(cfg.state_dir))
        check_dir("log_dir", cfg.log_dir, os.stat(cfg.log_dir))
        check_dir("log_dir/output", self.runner.output_dir, os.fstat(self.runner.output_dir_fd()))
        self.store.lock()
        if not become_subreaper():
            warn("warning: cannot become a child subreaper: processes that leave an attempt's"
                 " group may outlive it")
        try:
            self.runner.prepare()       # before the queue is loaded: the zygote warms up meanwhile
        except OSError as exc:          # each attempt tries again (and spawns if it must)
            warn("warning: cannot start the zygote: %s" % exc)
        self.log = EventLog(cfg.log_dir, self.clock)
        # Loading a million jobs makes a million objects the cycle collector would walk again
        # and again (40% of the load time): off while loading, then what was loaded is frozen
        # out of later collections. Jobs never form cycles; their memory goes by refcount.
        gc.disable()
        try:
            meta, records = self.store.load(Job.from_stored)
            self.jobs = JobTable(self.store, self.log, self.clock, self.scheduler)
            self.jobs.load(meta, records)
            self.schedules = Schedules(self.jobs, cfg)
            del records
        finally:
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
            gc.enable()
        for warning in self.store.warnings:
            warn("warning: " + warning)
        self.dispatcher.jobs, self.dispatcher.log = self.jobs, self.log
        header = len(_json_line({"gen": self.store.gen, "format": STORE_FORMAT}).encode())
        self.dispatcher.recover_running(bool(self.store.older) or self.store.size > header)
        self.jobs.settle_orphans()      # blocked on parents that all ended: settled, durably
        self.jobs.settle_budget = SETTLE_SLICE      # from now on the loop serves meanwhile
        self.schedules.load(meta, cfg.schedules, self.clock())     # after recovery: overlap
        self.store.commit()
        self.protocol.jobs = self.pruner.jobs = self.jobs     # loaded: requests may come
        self.connections.listener = self.connections.open_listener()
        self.connections.start_accepting()
        metrics = {}
        if cfg.metrics_listen:
            self.http = MetricsHTTP(cfg.metrics_listen, self.loop, self.metrics_text)
            try:
                metrics["metrics"] = self.http.open()
            except OSError as exc:
                raise StateError("metrics_listen %s: %s" % (cfg.metrics_listen,
                                                            exc.strerror or exc)) from None
        self.install_signals()
        self.loop.call_later(PRUNE_INTERVAL, self.pruner.auto_prune)
        if cfg.idle_timeout > 0:
            self.loop.call_later(cfg.idle_timeout / 4, self.connections.drop_idle)
        self.log.event("startup", pid=os.getpid(), version=VERSION, socket=cfg.socket,
                       jobs=len(self.jobs.jobs), workers=cfg.workers, **metrics)
        self.log.flush()

    def install_signals(self) -> None:
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        handled = [signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
        for sig in handled:
            signal.signal(sig, lambda signum, frame: None)    # the wakeup fd does the work
        self.loop.watch(self.wake_r.fileno(), selectors.EVENT_READ, "internal", self.on_signal)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        sd_notify("READY=1\nSTATUS=" + self.status_line())
        usec = os.environ.get("WATCHDOG_USEC", "")
        if usec.isdigit() and int(usec) > 0 and \
                os.environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
            self.watchdog(int(usec) / 2e6)
        if os.environ.get("NOTIFY_SOCKET"):
            self.loop.call_later(STATUS_INTERVAL, self.update_status, None)
        while not (self.stopping and not self.runner.active):
            self.run_pass(self.select_timeout())
        return self.finish()

    def select_timeout(self) -> float:
        timeout = 30.0                  # an upper bound: wall-clock jumps are noticed in time
        if self.this_pass.resume or self.pruner.prunes or self.protocol.bulk \
                or self.jobs.settling_left:
            return 0.0
        if self.store.folding is not None:
            timeout = FOLD_POLL         # its child says it is done on a pipe nobody watches
        due = None if self.stopping else self.dispatcher.next_start_in()
        if due == 0.0:
            return 0.0
        if due is not None:
            timeout = min(timeout, due)
        due = None if self.stopping else self.schedules.due_in(self.clock())
        if due is not None:
            timeout = min(timeout, due)
        for due in (self.loop.next_timer(), self.store.sync_due()):
            if due is not None:
                timeout = min(timeout, max(due - time.monotonic(), 0.0))
        return timeout

    def run_pass(self, timeout: float) -> None:
        """One pass: see the module docstring for the order and why."""
        clients = []
        for key, mask in self.loop.sel.select(timeout):
            kind, callback = key.data
            if kind == "client":
                clients.append((callback, mask))
            else:
                self.loop.call(callback, mask)
        self.loop.run_timers()
        self.dispatcher.dispatch()
        self.jobs.track()
        mark = self.log.mark()
        self.jobs.settle_more()                 # children left by a budget: the next slice
        # Tracked: a failed write undoes the fire. Fsynced at once: a fire is a change that a
        # machine crash must not lose either (missed = "skip" would not make it up).
        fired = 0 if self.stopping else self.schedules.fire_due(self.clock())
        self.connections.serve(clients)
        self.protocol.create_held()
        self.pruner.prune_some(PRUNE_SLICE)
        self.protocol.advance_bulk()
        if self.this_pass.batch_slots and self.store.do_fsync:
            self.connections.gather()
        self.commit(mark, sync=fired > 0)
        self.connections.flush()

    def commit(self, mark, sync: bool = False) -> None:
        """The pass's one journal write, of what this_pass (Pass) gathered: then its side
        effects run and its replies may go, or it is undone and they say io_error."""
        self.protocol.create_held()     # (the adds that gather() served)
        # A reply that reports a change (this pass's changing requests, a wait that ends) goes
        # out only once the change is durable; other changes may wait SYNC_DELAY for their fsync.
        finished, self.jobs.changed = self.jobs.changed, []    # the jobs that ended this pass
        enqueued, self.jobs.enqueued = self.jobs.enqueued, []  # and those added or put back
        ended = [job for job in finished if job.id in self.waits]
        this_pass = self.this_pass
        sync = this_pass.needs_sync(ended) or sync
        try:
            if self.store.broken is not None:
                self.repair()
            self.store.commit(sync)
        except OSError as exc:
            if self.journal_trouble.failed(1):
                warn("journal write failed: %s; changes get io_error until it works again"
                     % exc)
            self.jobs.undo()
            self.log.rewind(mark)
            this_pass.write_failed(exc, ended, self.jobs, self.waits)
            self.pruner.write_failed(exc)
            self.protocol.bulk_committed(exc)
        else:
            self.jobs.untrack()
            self.protocol.bulk_committed(None)
            this_pass.written(ended, self.waits)
            self.metrics.enqueued(enqueued)     # enqueued_total counts what is durable
        this_pass.committed()
        ends = [job.id for job in finished if job.state in FINISHED]   # (what undo() left)
        this_pass.unsynced_ends.update(ends)
        self.metrics.finished(len(ends))
        if self.store.settled():
            this_pass.unsynced_ends.clear()
        # Written (a crash of the daemon keeps it; its fsync may follow, since a crash of the
        # machine leaves no process behind), or the disk failed: then the job runs anyway,
        # and the full snapshot that repairs the store records it.
        for att in this_pass.starting:
            self.runner.release(att)
        this_pass.starting.clear()
        if self.store.folding is not None and self.store.reap_fold() is False:
            warn("background snapshot failed (the journal has everything; trying again in "
                 "%gs): %s" % (FOLD_RETRY, self.store.fold_error))
        if self.store.can_fold() and (self.compact_wanted or self.store.wants_compaction()):
            self.compact()
        self.log.flush()

    def repair(self) -> None:
        """Write a full snapshot to replace a journal that failed; at most once a second."""
        if time.monotonic() < self.repair_after:
            raise self.store.broken
        self.repair_after = time.monotonic() + 1.0
        self.store.snapshot(self.meta(), self.jobs.jobs)
        refused, self.journal_trouble = self.journal_trouble.lost, WriteTrouble()
        warn("state written again in full; the store is healthy (%d failed tries meanwhile)"
             % refused)

    def compact(self) -> None:
        """Fold the journal into a snapshot in the background (Store.fold)."""
        self.compact_wanted = False
        try:
            self.store.fold(self.meta(), self.jobs.jobs)
        except OSError as exc:      # the journal still holds everything; try again later
            warn("snapshot failed: %s" % exc)

    def metrics_text(self) -> str:
        """The `metrics` op's text (and GET /metrics): counters and the queues' own counts."""
        queues = list(self.scheduler.queues.values())
        schedules = sorted(self.schedules.next.items())     # those that will fire: name, when
        return self.metrics.render(queues, self.clock() - self.started,
                                   self.store.size + self.store.older_size, schedules)

    def meta(self) -> dict:
        return {"next_id": self.jobs.next_id, "paused": self.jobs.paused,
                "queues": self.jobs.queue_meta(), "schedules": self.schedules.meta()}

    def finish(self) -> int:
        """The graceful stop's last steps: every attempt has ended."""
        stopping = encode_error("shutting_down", "the daemon is stopping")
        self.waits.end_all(stopping)
        self.protocol.end_queries(stopping)
        self.pruner.prune_some(None)    # the loop is over: a prune under way ends at once
        self.commit(self.log.mark())
        self.pruner.prune_some(None)    # (its last output files, now that it is durable)
        try:
            self.store.snapshot(self.meta(), self.jobs.jobs)
        except OSError as exc:
            warn("final snapshot failed (the journal has everything): %s" % exc)
        self.connections.close_all()
        self.runner.close()
        self.connections.close_listener()
        if self.http is not None:
            self.http.close()
        uptime = self.clock() - self.started
        reason = self.stop_reason or "stopped"
        self.log.event("shutdown", pid=os.getpid(), uptime=uptime, reason=reason)
        self.log.close()
        self.store.close()
        say_shutdown(reason, uptime)
        return 0

    def internal_error(self, where: str, exc: Exception) -> None:
        """A bug: an exception no code expected, caught where it would have stopped the daemon.
        Its traceback goes to the errors log and a line to stderr, once per place it was raised
        (a bug met every pass floods neither), and the daemon goes on."""
        import traceback
        frames = traceback.extract_tb(exc.__traceback__)[-1:]
        place = (where, type(exc).__name__, *((f.filename, f.lineno) for f in frames))
        if place in self.bugs or len(self.bugs) >= MAX_BUG_PLACES:
            return
        self.bugs.add(place)
        error = "%s: %s" % (type(exc).__name__, exc)
        if self.log is not None:
            self.log.error("internal_error", "".join(traceback.format_exception(exc)),
                           where=where, error=error)
        warn("internal error in %s: %s (traceback in %s; said once)"
             % (where, error, EventLog.NAMES["errors"]))

    # -- signals -----------------------------------------------------------------------------

    def on_signal(self, mask: int) -> None:
        try:
            data = self.wake_r.recv(4096)
        except BlockingIOError:
            return
        # Each signal's work is a callback of its own: a bug met while reaping must not lose
        # a SIGTERM read in the same batch.
        for signum in set(data):
            if signum == signal.SIGCHLD:
                self.loop.call(self.runner.reap)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stop_reason = self.stop_reason or _signal_name(signum)
                self.loop.call(self.begin_stop)
            elif signum == signal.SIGHUP:
                self.loop.call(self.reload)

    def begin_stop(self) -> None:
        """Stop starting attempts; give running ones shutdown_grace, then stop them."""
        if self.stopping:                       # a second signal: do not wait any longer
            self.interrupt_all()
            return
        self.stopping = self.dispatcher.stopping = self.connections.stopping = True
        sd_notify("STOPPING=1")
        if not self.connections.own_socket:     # systemd holds new clients for the next daemon
            self.connections.stop_accepting()   # meanwhile
        if self.runner.active:
            self.loop.call_later(self.cfg.shutdown_grace, self.interrupt_all)
        self.loop.call_later(self.cfg.shutdown_grace + self.cfg.kill_grace + STOP_SLACK,
                             self.abandon_all)

    def interrupt_all(self) -> None:
        for att in list(self.runner.active.values()):
            self.runner.stop(att, "shutdown")

    def abandon_all(self) -> None:
        """SPEC §3: a graceful stop ends within shutdown_grace + kill_grace + a few seconds,
        whatever job processes and zygotes do. What is still running now is given up."""
        for att in list(self.runner.active.values()):
            warn("job %d: its attempt did not end in time for the stop; given up"
                 % att.job.id)
            self.runner.abandon(att)

    def reload(self) -> None:
        """SIGHUP: reopen the log files (logrotate), re-read allow, limits, the queues (each
        queue's slots as configured again, set_workers undone) and the schedules (each keeps
        its state) from the config; a config that no longer loads is refused, logged."""
        sd_notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))
        self.connections.group_cache.clear()
        try:
            self.log.reopen()
        except OSError as exc:
            warn("reload: cannot reopen the logs (%s); writing on to the open ones" % exc)
        try:
            self.runner.restart()
        except OSError as exc:          # no fd or memory now: the next start tries again
            warn("reload: cannot start a new zygote (%s); attempts start as before" % exc)
        if self.cfg.path:
            try:
                fresh = load_config(self.cfg.path, {})
            except ConfigError as exc:
                warn("reload: %s; keeping the old config" % exc)
                self.log.event("reload", ok=False, error=str(exc))
            else:
                self.cfg.allow, self.cfg.limits = fresh.allow, fresh.limits
                self.cfg.queues, self.cfg.isolation = fresh.queues, fresh.isolation
                self.cfg.max_jobs_per_worker = fresh.max_jobs_per_worker
                self.scheduler.configure(self.cfg)
                self.cfg.schedules = fresh.schedules
                self.schedules.configure(fresh.schedules, self.clock())
                self.log.event("reload", ok=True, schedules=len(fresh.schedules))
        sd_notify("READY=1")

    # -- jobs --------------------------------------------------------------------------------

    def watchdog(self, interval: float) -> None:
        """WATCHDOG=1 every WATCHDOG_USEC/2, from the loop itself: a stuck loop stops pinging."""
        sd_notify("WATCHDOG=1")
        self.loop.call_later(interval, self.watchdog, interval)

    def update_status(self, last: str | None) -> None:
        line = self.status_line()
        if line != last:
            sd_notify("STATUS=" + line)
        self.loop.call_later(STATUS_INTERVAL, self.update_status, line)

    def status_line(self) -> str:
        c = self.jobs.counts
        return "%d running, %d pending, %d failed%s" % (
            c[RUNNING], c[PENDING], c[FAILED], ", paused" if self.jobs.paused else "")


class Connections:
    """The clients: accepting them (peer credentials, max_connections, no spinning when no fd is
    free), framing their request lines and pipelining them fairly (per-pass budgets), and their
    replies (in request order, after the pass's commit, within max_reply_buffer), idle and
    hang-up checks. Each request line goes to the protocol; the loop calls serve(), gather() and
    flush() once per pass, and the callbacks it watches for (on_accept, on_client)."""

    def __init__(self, cfg: Config, loop: Loop, store: Store, this_pass: Pass, waits: Waiters,
                 protocol: "Protocol"):
        self.cfg = cfg
        self.loop = loop
        self.store = store                         # gather() waits no longer than its fsyncs take
        self.this_pass = this_pass
        self.waits = waits
        self.protocol = protocol
        self.conns: set[Connection] = set()
        self.reply_bytes = 0                       # unsent replies over all connections (outbufs)
        self.pass_replies = 0                      # replies made this pass, not yet in an outbuf
        self.reply_share = min(MAX_PENDING_OUTPUT,  # one connection's part of max_reply_buffer
                               max(1, cfg.max_reply_buffer // cfg.max_connections))
        self.accepting = False                     # the listener is watched
        self.accept_timer: list | None = None      # accept again, after EMFILE
        self.accept_warned = False                 # said once that no fd was free
        self.hangup_timer: list | None = None      # look for half-closed waiters that left
        self.requests_until = math.inf             # this pass's requests stop at (monotonic)
        self.read_buf = bytearray(READ_CHUNK)      # every recv() from a client goes here first
        self.read_view = memoryview(self.read_buf)
        self.listener: socket.socket | None = None
        self.own_socket = True                     # False under socket activation
        self.stopping = False                      # the daemon stops: see start_accepting()
        self.uid = os.getuid()
        self.group_cache: dict[int, set[int]] = {}  # uid -> its groups; cleared on SIGHUP

    def serve(self, clients: list) -> None:
        """This pass's requests: clients held over from earlier passes go on, then the ones
        select() found ready. Two budgets: a new request (a `stats` while 250 clients each wait
        for a big `list`) is not queued behind all those held over."""
        self.requests_until = time.monotonic() + PASS_REQUEST_TIME
        for conn in self.this_pass.resume:
            if not conn.closed:
                self.handle_input(conn)
                self.this_pass.dirty.add(conn)
        self.this_pass.resume.clear()
        self.requests_until = time.monotonic() + PASS_REQUEST_TIME
        for callback, mask in clients:
            self.loop.call(callback, mask)

    def close_all(self) -> None:
        """The stop's last replies: what can be sent without waiting goes, then every client
        is closed."""
        self.flush()
        for conn in list(self.conns):
            self.send_some(conn)
            self.close(conn)

    def close_listener(self) -> None:
        self.loop.unwatch(self.listener.fileno())
        self.listener.close()
        if self.own_socket:
            try:
                os.unlink(self.cfg.socket)
            except OSError:
                pass

    def open_listener(self) -> socket.socket:
        if os.environ.get("LISTEN_PID") == str(os.getpid()) and \
                int(os.environ.get("LISTEN_FDS", "0") or 0) >= 1:
            sock = socket.socket(fileno=3)          # systemd socket activation (SD_LISTEN_FDS_START)
            sock.setblocking(False)
            self.own_socket = False
            return sock
        path = self.cfg.socket
        make_dirs(os.path.dirname(path), 0o750)
        if os.path.lexists(path):
            import stat
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise StateError("%s exists and is not a socket; not replacing it" % path)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(2.0)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)                     # stale: nobody answers on it
            except OSError as exc:
                raise StateError("cannot probe existing socket %s: %s" % (path, exc)) from None
            else:
                raise StateError("%s is live: another jobrunnerd is listening on it" % path)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o777 & ~self.cfg.socket_mode)   # never more open than asked
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, self.cfg.socket_mode)
        sock.listen(min(socket.SOMAXCONN, 4096))
        sock.setblocking(False)
        return sock

    def start_accepting(self) -> None:
        """Watch the listener (again); not once a stop under socket activation has begun."""
        Loop.cancel(self.accept_timer)
        self.accept_timer = None
        if self.accepting or (self.stopping and not self.own_socket):
            return
        self.accepting = True
        self.loop.watch(self.listener.fileno(), selectors.EVENT_READ, "client", self.on_accept)

    def stop_accepting(self) -> None:
        self.accepting = False
        self.loop.unwatch(self.listener.fileno())

    def fd_freed(self) -> None:
        """A connection or an attempt let go of its fds: accept again if we had run out."""
        if not self.accepting and self.accept_timer is not None:
            self.start_accepting()

    def on_accept(self, mask: int) -> None:
        for _ in range(64):             # a burst of connections, but do not starve the others
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                if self.accept_warned:          # every waiting client is in: fds to spare
                    warn("accept: accepting new clients again")
                    self.accept_warned = False
                return
            except OSError as exc:
                # No fd free (EMFILE, ENFILE, ENOBUFS...): the listener stays readable, so
                # watching it would spin. Serve who we have; accept again when a connection
                # or an attempt frees an fd, or after ACCEPT_RETRY (fds may close elsewhere).
                if not self.accept_warned:
                    warn("accept: %s; not accepting new clients until a file descriptor is "
                         "free" % (exc.strerror or exc))
                    self.accept_warned = True
                self.stop_accepting()
                self.accept_timer = self.loop.call_later(ACCEPT_RETRY, self.start_accepting)
                return
            sock.setblocking(False)
            uid = self.peer_uid(sock)
            if uid is None or not self.peer_allowed(uid):
                self.refuse(sock, "forbidden", "uid %s may not use this daemon" % uid)
            elif len(self.conns) >= self.cfg.max_connections:
                self.refuse(sock, "busy", "too many connections (max_connections=%d)"
                            % self.cfg.max_connections)
            else:
                conn = Connection(sock, uid)
                conn.on_event = functools.partial(self.on_client, conn)
                self.conns.add(conn)
                self.loop.watch(conn.fd, selectors.EVENT_READ, "client", conn.on_event)

    @staticmethod
    def refuse(sock: socket.socket, code: str, message: str) -> None:
        try:
            sock.send(encode_error(code, message))
        except OSError:
            pass
        sock.close()

    @staticmethod
    def peer_uid(sock: socket.socket) -> int | None:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return struct.unpack("3i", creds)[1]
        except OSError:
            return None

    def peer_allowed(self, uid: int) -> bool:
        if uid == 0 or uid == self.uid or uid in self.cfg.allowed_uids:
            return True
        if not self.cfg.allowed_gids:
            return False
        groups = self.group_cache.get(uid)     # cleared on SIGHUP
        if groups is None:
            import pwd
            try:
                user = pwd.getpwuid(uid)
                groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
            except (KeyError, OSError):
                groups = set()
            self.group_cache[uid] = groups
        return bool(groups & set(self.cfg.allowed_gids))

    def drop_idle(self) -> None:
        """Hang up on clients with no request in progress (a pending wait is one) for
        idle_timeout: no request came in and no reply went out. One that sent half a request
        is told so first; one that does not read its replies is not (it would not read it)."""
        idle = self.cfg.idle_timeout
        self.loop.call_later(idle / 4, self.drop_idle)
        now = time.monotonic()
        for conn in list(self.conns):
            if conn.closed or conn.waiting() or now - conn.last_active <= idle:
                continue
            if conn.inbuf and not conn.eof and not conn.outbuf and not conn.slots:
                conn.slots.append([encode_error("bad_request", "request not finished within %gs"
                                                % idle)])
                conn.eof = True
                conn.inbuf.clear()
                conn.last_active = now      # the time to read that reply
                self.this_pass.dirty.add(conn)
            else:
                self.close(conn)

    def gather(self) -> None:
        """Group commit across clients: before paying an fsync for this pass's changes, wait
        (at most as long as the last fsync took, and GATHER_MAX) for the next request of each
        client that was busy a moment ago but has sent nothing this pass. Sixteen clients that
        each wait for their reply then share one fsync instead of splitting into two halves
        that take turns. A lone client is never kept waiting."""
        now = time.monotonic()
        expected = {conn.fd: conn for conn in self.conns      # dirty: served this pass
                    if conn not in self.this_pass.dirty and not conn.eof and not conn.waiting()
                    and now - conn.last_input < GATHER_ACTIVE}
        deadline = now + min(self.store.sync_seconds, GATHER_MAX)
        while expected and now < deadline:
            ready = self.loop.sel.select(deadline - now)
            if not ready:
                break
            for key, mask in ready:
                conn = expected.pop(key.fd, None)
                if conn is None:
                    return              # something else needs the loop: commit now
                self.loop.call(conn.on_event, mask)
            now = time.monotonic()

    def on_client(self, conn: Connection, mask: int) -> None:
        if conn.closed:
            return                      # closed earlier in this pass (gather, drop_idle)
        if mask & selectors.EVENT_READ and not conn.eof:
            try:
                # into one buffer kept for it: a fresh READ_CHUNK per recv() would be an
                # mmap() and munmap() each (see keep_big_blocks_apart)
                n = conn.sock.recv_into(self.read_buf)
                data = self.read_view[:n]
            except BlockingIOError:
                data = None
            except OSError:             # ECONNRESET: the client is gone, replies and all
                self.close(conn)
                return
            if data:
                conn.inbuf += data
                conn.last_input = conn.last_active = time.monotonic()
                self.handle_input(conn)
            elif data is not None:      # end of input
                if self.hung_up(conn):  # closed, not just its write side: nobody to answer
                    self.close(conn)
                    return
                # A half-close (SHUT_WR): every whole request sent before it is answered,
                # then we close (send_some); a last line without its newline is refused.
                conn.eof = True
                self.handle_input(conn)
        # Writable or not, replies go out in flush(), after this pass's commit: a reply made
        # just now may report a change that is not yet durable.
        self.this_pass.dirty.add(conn)

    def handle_input(self, conn: Connection) -> None:
        """Serve the complete request lines in conn.inbuf, as many as is fair this pass."""
        buf, start, limit = conn.inbuf, 0, self.cfg.max_request_bytes
        budget, produced = MAX_LINES_PER_PASS, 0
        throttled = False
        while buf and not conn.waiting():
            if conn.outbuf or (produced and self.backlogged(produced)):
                throttled = True
                break                   # the rest when its replies are read (send_some)
            if budget == 0:
                break
            if time.monotonic() > self.requests_until:
                break                   # the rest next pass (send_some resumes it)
            budget -= 1
            end = buf.find(b"\n", start)
            if end < 0:
                if len(buf) - start > limit:
                    self.too_large(conn)
                elif conn.eof and len(buf) > start:
                    conn.slots.append([encode_error(
                        "bad_request", "request line not ended by a newline before the end "
                        "of input")])
                    start = len(buf)
                break
            if end - start > limit:
                self.too_large(conn)
                break
            slot = self.protocol.handle_line(conn, bytes(buf[start:end]))
            conn.slots.append(slot)
            made = len(slot[0] or b"")
            produced += made
            self.pass_replies += made
            start = end + 1
        del buf[:start]
        if budget == 0 and not throttled:
            self.this_pass.resume.add(conn)       # more lines may be waiting: next pass

    def backlogged(self, produced: int) -> bool:
        """Replies to a connection are made while the kernel took all those made before (its
        outbuf is empty), up to its share of max_reply_buffer, and while all connections
        together hold less than max_reply_buffer. So one that does not read its replies
        holds at most one share (or one reply) more than the kernel takes, and a client
        that reads is served however many do not."""
        return produced >= self.reply_share or \
            self.reply_bytes + self.pass_replies >= self.cfg.max_reply_buffer

    @staticmethod
    def hung_up(conn: Connection) -> bool:
        """At end of input: did the client close (POLLHUP) rather than shut its write side
        only? On a Unix stream socket only a peer that can no longer read gives POLLHUP."""
        poller = select.poll()
        poller.register(conn.fd, select.POLLIN)
        return any(revents & (select.POLLHUP | select.POLLERR)
                   for _, revents in poller.poll(0))

    def check_hangups(self) -> None:
        """A client whose wait is pending and that we do not read (it shut its write side:
        its end of input stays readable; or it sent MAX_UNHANDLED_INPUT after the wait) is
        not watched for its close: look for POLLHUP every HANGUP_CHECK instead."""
        self.hangup_timer = None
        left = False
        for conn in [c for c in self.conns if c.waiting() and not self.reading(c)]:
            if self.hung_up(conn):
                self.close(conn)
            else:
                left = True
        if left:
            self.hangup_timer = self.loop.call_later(HANGUP_CHECK, self.check_hangups)

    def too_large(self, conn: Connection) -> None:
        conn.slots.append([encode_error("too_large", "request longer than max_request_bytes=%d"
                                        % self.cfg.max_request_bytes)])
        conn.eof = True
        conn.inbuf.clear()

    def flush(self) -> None:
        for conn in self.this_pass.dirty:
            if not conn.closed:
                self.send_some(conn)
        self.this_pass.dirty.clear()
        self.pass_replies = 0           # all in outbufs now, and counted there
        self.requests_until = math.inf  # outside serve(), a request is never held back

    def send_some(self, conn: Connection) -> None:
        slots = conn.slots
        ready = 0
        while ready < len(slots) and slots[ready][0] is not None:
            conn.outbuf += slots[ready][0]
            ready += 1
        del slots[:ready]
        if conn.outbuf:
            before = len(conn.outbuf)
            if not send_some_of(conn.sock, conn.outbuf):
                self.close(conn)
                return
            if len(conn.outbuf) < before:
                conn.last_active = time.monotonic()
                # What was sent stays allocated until a bytearray is half empty: give it back
                # sooner, so that what we count (len) is what a client holds.
                if sys.getsizeof(conn.outbuf) > len(conn.outbuf) * 5 // 4 + 4096:
                    conn.outbuf = bytearray(conn.outbuf)
        self.reply_bytes += len(conn.outbuf) - conn.counted
        conn.counted = len(conn.outbuf)
        if conn.eof and not conn.outbuf and not conn.slots and not conn.inbuf:
            self.close(conn)
            return
        whole = b"\n" in conn.inbuf
        if not conn.outbuf and not conn.waiting() and (whole or (conn.eof and conn.inbuf)):
            self.this_pass.resume.add(conn)       # requests held back while its replies were unread
        reading = self.reading(conn)
        if conn.waiting() and not reading and self.hangup_timer is None:
            self.hangup_timer = self.loop.call_later(HANGUP_CHECK, self.check_hangups)
        events = (selectors.EVENT_READ if reading else 0) | \
            (selectors.EVENT_WRITE if conn.outbuf else 0)
        if events:
            self.loop.watch(conn.fd, events, "client", conn.on_event)
        else:
            self.loop.unwatch(conn.fd)

    @staticmethod
    def reading(conn: Connection) -> bool:
        """Do we read from `conn` now? A line still arriving that handle_input takes at once
        is bounded by max_request_bytes (it answers too_large past it), whatever that is set
        to; input that waits its turn (behind a wait, behind unread replies, or many whole
        requests) by MAX_UNHANDLED_INPUT. While a wait is pending we read on: that is how a
        client that hangs up meanwhile is seen at once."""
        served = not conn.outbuf and not conn.waiting()
        return not conn.eof and ((served and b"\n" not in conn.inbuf)
                                 or len(conn.inbuf) < MAX_UNHANDLED_INPUT)

    def close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.waiting():              # nobody to answer: its wait ends here, timer and all
            self.waits.drop(conn)
        self.loop.unwatch(conn.fd)
        conn.on_event = None            # it refers back to conn: no cycle left for the collector
        conn.sock.close()
        self.conns.discard(conn)
        self.reply_bytes -= conn.counted
        conn.counted = 0
        conn.inbuf, conn.outbuf = bytearray(), bytearray()  # memory back now, not when the
        conn.slots = []                     # last reference to conn (a timer, a set) goes
        self.fd_freed()


class HTTPClient:
    """One connection to the metrics listener: its request head so far, its response."""

    __slots__ = ("sock", "fd", "inbuf", "outbuf", "deadline", "on_event")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.deadline = deadline        # monotonic: answered and gone by then, or dropped
        self.on_event = None


class MetricsHTTP:
    """metrics_listen: `GET /metrics` over HTTP/1.x (text/plain; version=0.0.4), any other
    path 404, from the daemon's own loop and never blocking it. Every socket is non-blocking
    and watched by the loop's selector; a callback reads or writes what is there and returns.
    Caps, as for socket clients: METRICS_HTTP_MAX_CONNECTIONS at once (one more is told 503
    and closed), a request head of METRICS_HTTP_MAX_HEAD bytes (431 past it), and
    METRICS_HTTP_TIMEOUT from connect to the last byte sent (a slow or idle client is
    dropped). One response per connection, then it is closed (Connection: close).
    For the loop: open() once, close() at the stop; `render` makes the text."""

    def __init__(self, address: str, loop: Loop, render):
        self.address = address
        self.loop = loop
        self.render = render
        self.listener: socket.socket | None = None
        self.clients: dict[int, HTTPClient] = {}
        self.timer: list | None = None
        self.bound = ""                             # HOST:PORT once open (port 0 resolved)

    def open(self) -> str:
        """Bind and listen; returns the address bound as HOST:PORT (port 0 picks one)."""
        host, port = split_listen(self.address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(METRICS_HTTP_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.listener = sock
        self.loop.watch(sock.fileno(), selectors.EVENT_READ, "internal", self.on_accept)
        bound = sock.getsockname()
        self.bound = ("[%s]:%d" if family == socket.AF_INET6 else "%s:%d") % bound[:2]
        return self.bound

    def close(self) -> None:
        for client in list(self.clients.values()):
            self.drop(client)
        if self.listener is not None:
            self.loop.unwatch(self.listener.fileno())
            self.listener.close()
            self.listener = None
        Loop.cancel(self.timer)

    def on_accept(self, mask: int) -> None:
        for _ in range(METRICS_HTTP_MAX_CONNECTIONS):   # a flood waits for the next pass
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:                 # no fd free: the socket clients come first,
                self.loop.unwatch(self.listener.fileno())   # and a readable listener must
                self.loop.call_later(ACCEPT_RETRY, self.rewatch)    # not spin the loop
                return
            sock.setblocking(False)
            if len(self.clients) >= METRICS_HTTP_MAX_CONNECTIONS:
                try:                        # (its request read first if it came: a close
                    sock.recv(METRICS_HTTP_MAX_HEAD)    # with unread input resets at once)
                except OSError:
                    pass
                try:
                    sock.send(http_response(503, b"too many connections\n"))
                except OSError:
                    pass
                sock.close()
                continue
            client = HTTPClient(sock, time.monotonic() + METRICS_HTTP_TIMEOUT)
            client.on_event = functools.partial(self.on_client, client)
            self.clients[client.fd] = client
            self.loop.watch(client.fd, selectors.EVENT_READ, "internal", client.on_event)
            if self.timer is None:
                self.timer = self.loop.call_later(METRICS_HTTP_TIMEOUT, self.drop_late)

    def rewatch(self) -> None:
        if self.listener is not None:
            self.loop.watch(self.listener.fileno(), selectors.EVENT_READ, "internal",
                            self.on_accept)

    def on_client(self, client: HTTPClient, mask: int) -> None:
        if client.fd not in self.clients:
            return
        if client.outbuf:
            self.send(client)
            return
        try:
            data = client.sock.recv(METRICS_HTTP_MAX_HEAD + 1 - len(client.inbuf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop(client)
            return
        if not data:                        # gone before a whole request: nobody to answer
            self.drop(client)
            return
        client.inbuf += data
        end = client.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = client.inbuf.find(b"\n\n")
        if end < 0:
            if len(client.inbuf) > METRICS_HTTP_MAX_HEAD:
                self.respond(client, http_response(431, b"request head too large\n"))
            return
        self.respond(client, self.answer(bytes(client.inbuf[:end])))

    def answer(self, head: bytes) -> bytes:
        """The response to one request head."""
        parts = head.split(b"\n", 1)[0].strip().split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return http_response(400, b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return http_response(405, b"only GET\n", extra=b"Allow: GET, HEAD\r\n")
        if target != b"/metrics":
            return http_response(404, b"not found; the metrics are at /metrics\n")
        body = self.render().encode("utf-8")
        return http_response(200, body, METRICS_CONTENT_TYPE, head_only=method == b"HEAD")

    def respond(self, client: HTTPClient, response: bytes) -> None:
        client.inbuf = bytearray()
        client.outbuf = bytearray(response)
        self.send(client)

    def send(self, client: HTTPClient) -> None:
        try:
            sent = client.sock.send(client.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.drop(client)
            return
        del client.outbuf[:sent]
        if not client.outbuf:
            self.drop(client)               # one response per connection
        else:
            self.loop.watch(client.fd, selectors.EVENT_WRITE, "internal", client.on_event)

    def drop(self, client: HTTPClient) -> None:
        if self.clients.pop(client.fd, None) is None:
            return
        self.loop.unwatch(client.fd)
        client.on_event = None              # it refers back to client: no cycle
        try:
            client.sock.close()
        except OSError:
            pass

    def drop_late(self) -> None:
        """Every connection past its deadline goes (slow, idle, or not reading)."""
        self.timer = None
        now = time.monotonic()
        for client in list(self.clients.values()):
            if client.deadline <= now:
                self.drop(client)
        if self.clients:
            soonest = min(client.deadline for client in self.clients.values())
            self.timer = self.loop.call_later(max(0.0, soonest - now) + 0.01, self.drop_late)


HTTP_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def http_response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
                  extra: bytes = b"", head_only: bool = False) -> bytes:
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n%s\r\n" % (status, HTTP_REASONS[status].encode(),
                                                content_type.encode(), len(body), extra)
            + (b"" if head_only else body))


def split_listen(text: str) -> tuple[str, int]:
    """metrics_listen "HOST:PORT" ("[::1]:9100" for IPv6) -> (host, port); ValueError if not."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be \"HOST:PORT\", e.g. \"127.0.0.1:9100\"")
    return host, int(port)


class Protocol:
    """The protocol handlers: one method per op (op_*), listed in HANDLERS below; each takes the
    validated request and its connection and returns the reply's fields, or a reply slot to
    fill later (wait, a pattern list, prune), or raises ProtocolError. handle_line() is the one
    place that turns any exception into an error reply. Changing requests add to the pass
    (Pass): their replies wait for its commit. Plain adds in a row are created together
    (hold_add, create_held): any other request, and the pass's commit, see them created."""

    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon                       # stopping, internal_error
        self.jobs: JobTable | None = None          # the table, once Daemon.setup() loaded it
        self.cfg = daemon.cfg
        self.clock = daemon.clock
        self.loop = daemon.loop
        self.runner = daemon.runner
        self.attempts = daemon.attempts            # job id -> its running attempt
        self.prunes = daemon.pruner.prunes         # prunes under way (Pruner.prune_some)
        self.started = daemon.started
        self.this_pass = daemon.this_pass
        self.waits = daemon.waits
        self.metrics = daemon.metrics              # enqueued_total, activity
        self.queries: list[tuple] = []             # (conn, slot, PatternQuery) under way
        self.bulk: collections.deque[BulkChange] = collections.deque()  # `where`s under way
        self.held: list[dict] = []                 # plain adds answered, not yet created
        self.held_slots: list[list] = []           # (hold_add, create_held) and their replies
        self.held_at = 0.0                         # their `now`

    def end_queries(self, reply: bytes) -> None:
        """The daemon stops: every pattern query under way is answered with `reply`, and
        every `cancel`/`retry` with `where` too (its steps so far are done)."""
        for conn, slot, query in self.queries:
            slot[0] = reply
            self.this_pass.dirty.add(conn)
        self.queries.clear()
        for task in self.bulk:
            self.bulk_answer(task, reply)
        self.bulk.clear()

    def handle_line(self, conn: Connection, line: bytes) -> list:
        """One request -> its reply slot. Every exception becomes an error reply here."""
        op = None
        try:
            req = decode_request(line)
            op = req.get("op")
            if not isinstance(op, str):
                raise ProtocolError("bad_request", "missing field 'op'")
            handler = HANDLERS.get(op)
            if handler is None:
                raise ProtocolError("unknown_op", "unknown op %r" % op[:50])
            if self.held and op != "add":
                self.create_held()              # what it reads or changes includes them
            check_fields(req, OP_FIELDS[op])
            if op in MUTATING and self.daemon.stopping:
                raise ProtocolError("shutting_down", "the daemon is stopping")
            result = handler(self, req, conn)
            slot = result if isinstance(result, list) else [encode_reply(result)]
            if op in MUTATING:
                self.this_pass.batch_slots.append(slot)
            return slot
        except ProtocolError as exc:
            return [encode_error(exc.code, exc.message)]
        except Exception as exc:            # a bug here must not take the daemon down
            self.daemon.internal_error("op %s" % op if op in HANDLERS else "handle_line", exc)
            return [encode_error("bad_request", "internal error in %s: %s: %s"
                                 % (op, type(exc).__name__, exc))]

    def find(self, req: dict) -> Job:
        job = self.jobs.jobs.get(get_id(req))
        if job is None:
            raise ProtocolError("not_found", "no job %d" % req["id"])
        return job

    def op_hello(self, req: dict, conn: Connection) -> dict:
        return {"protocol": PROTOCOL, "version": VERSION}

    def op_add(self, req: dict, conn: Connection) -> dict:
        if req.keys() <= _PLAIN_ADD:
            slot = self.hold_add(req, conn)
            if slot is not None:
                return slot
        self.create_held()
        now = self.clock()
        fields = validate_add(req, self.cfg, now)
        existing = self.jobs.keys.get(fields["key"])     # keys holds no None: no key, no match
        if existing is not None:
            return {"id": existing, "created": False}
        self.check_parents(fields["after"])
        self.check_room(1)
        fields["uid"] = conn.uid
        job_id = self.jobs.create(now, [fields])[0].id
        return [b'{"ok":true,"id":%d,"created":true}\n' % job_id]   # the common reply, ready-made

    def hold_add(self, req: dict, conn: Connection) -> list | None:
        """A plain add (target, args, kwargs: no key to look up, no parent) is answered at
        once and its job created with the plain adds after it, in one create() (one journal
        entry, one log head: a pipelined client's adds cost what an add_batch's jobs do).
        Its id is known: next_id plus the adds held before it, as nothing else creates a job
        meanwhile (any other request, and the pass's commit, create them first). They share
        the first one's `now`, as a batch's jobs do. None: not held (the caller goes on)."""
        now = self.held_at if self.held else self.clock()
        fields = plain_add(req, self.cfg, now)
        if fields is None:
            return None
        counts = self.jobs.counts
        if counts[BLOCKED] + counts[PENDING] + counts[RUNNING] + len(self.held) \
                >= self.cfg.max_queued:
            return None                     # check_room() words the refusal
        fields["uid"] = conn.uid
        slot = [b'{"ok":true,"id":%d,"created":true}\n' % (self.jobs.next_id + len(self.held))]
        if not self.held:
            self.held_at = now
        self.held.append(fields)
        self.held_slots.append(slot)
        return slot

    def create_held(self) -> None:
        """Create the held adds (see hold_add), whose replies already give their ids."""
        if not self.held:
            return
        held, slots, self.held, self.held_slots = self.held, self.held_slots, [], []
        first = self.jobs.next_id
        try:
            created = self.jobs.create(self.held_at, held)
            if created[0].id != first or created[-1].id != first + len(held) - 1:
                raise AssertionError("held adds got ids %d-%d, not %d-%d" % (
                    created[0].id, created[-1].id, first, first + len(held) - 1))
        except Exception as exc:            # a bug: their replies must not say "created"
            self.daemon.internal_error("op add", exc)
            error = encode_error("bad_request", "internal error in add: %s: %s"
                                 % (type(exc).__name__, exc))
            for slot in slots:
                slot[0] = error

    def op_add_batch(self, req: dict, conn: Connection) -> dict:
        jobs = req.get("jobs")
        if not isinstance(jobs, list):
            raise ProtocolError("bad_request", "jobs must be a list of add objects")
        now, cfg = self.clock(), self.cfg
        batch, plain = [], 0
        for i, item in enumerate(jobs):
            # a plain object straight to plain_add(): no "jobs[i]: " made for its messages
            fields = plain_add(item, cfg, now) \
                if type(item) is dict and item.keys() <= _PLAIN_ADD else None
            if fields is None:
                if not isinstance(item, dict):
                    raise ProtocolError("bad_request", "jobs[%d] must be an object" % i)
                item = {k: v for k, v in item.items() if k != "op"} if "op" in item else item
                fields = validate_add(item, cfg, now, "jobs[%d]: " % i, position=i)
            else:
                plain += 1
            batch.append(fields)
        if plain == len(batch):         # no key, no parent: every item a new job, in order
            self.check_room(plain)
            uid = conn.uid
            for fields in batch:
                fields["uid"] = uid
            return {"ids": [job.id for job in self.jobs.create(now, batch)]}
        # Each item is an existing job (its key is live: that id) or a new one; a key that
        # comes twice in the batch makes one job. refs[i] is an id or an index into `fresh`.
        refs, fresh, new_keys = [], [], {}
        for fields in batch:
            key = fields["key"]
            existing = self.jobs.keys.get(key)
            if existing is not None:
                refs.append(existing)
            elif key is not None and key in new_keys:
                refs.append(new_keys[key])
            else:
                if key is not None:
                    new_keys[key] = (len(fresh),)
                refs.append((len(fresh),))
                fields["uid"] = conn.uid
                fresh.append(fields)
        # `after`: a negative entry -k is the job k places earlier in the batch (an existing
        # job, or the id create() is about to give: they are consecutive from next_id).
        base = self.jobs.next_id
        for i, fields in enumerate(batch):
            after = fields["after"]
            if not after or type(refs[i]) is int or refs[i][0] >= len(fresh) \
                    or fresh[refs[i][0]] is not fields:
                continue                        # no parents, or not a new job of its own
            self.check_parents([entry for entry in after if entry > 0], "jobs[%d]: " % i)
            if any(entry < 0 for entry in after):
                resolved = (entry if entry > 0 else refs[i + entry] for entry in after)
                fields["after"] = list(dict.fromkeys(
                    ref if type(ref) is int else base + ref[0] for ref in resolved))
        self.check_room(len(fresh))
        created = self.jobs.create(now, fresh)
        return {"ids": [ref if type(ref) is int else created[ref[0]].id for ref in refs]}

    def check_parents(self, after: list[int], where: str = "") -> None:
        jobs = self.jobs.jobs
        for parent_id in after:
            if parent_id not in jobs:
                raise ProtocolError("not_found", "%safter: no job %d" % (where, parent_id))

    def check_room(self, n: int) -> None:
        live = self.jobs.counts[BLOCKED] + self.jobs.counts[PENDING] + self.jobs.counts[RUNNING]
        if live + n > self.cfg.max_queued:
            raise ProtocolError("queue_full", "%d live jobs; max_queued=%d"
                                % (live, self.cfg.max_queued))

    def op_get(self, req: dict, conn: Connection) -> dict:
        return {"job": self.find(req).record()}

    def op_list(self, req: dict, conn: Connection) -> dict:
        state = req.get("state")
        if state is not None and state not in STATES:
            raise ProtocolError("bad_request", "state must be one of " + ", ".join(STATES))
        pattern = get_pattern(req)
        limit = get_int(req, "limit", LIST_DEFAULT, 1, LIST_MAX)
        order = req.get("order", "asc")
        if order not in ("asc", "desc"):
            raise ProtocolError("bad_request", 'order must be "asc" or "desc"')
        if "before_id" in req and order != "desc":
            raise ProtocolError("bad_request", 'before_id pages newest first: give "order": "desc"')
        if "after_id" in req and order != "asc":
            raise ProtocolError("bad_request", 'after_id pages oldest first: not with "order": "desc"')
        after = get_int(req, "after_id", 0, 0, 2 ** 63 - 1)
        # desc without before_id: from the newest job (ids stay below 2**63).
        before = get_int(req, "before_id", 2 ** 63 - 1, 1, 2 ** 63 - 1) if order == "desc" else None
        queue = get_queue_name(req) if "queue" in req else None
        schedule = get_schedule_name(req) if "schedule" in req else None
        # One job past the page says whether there are more (`more`), without counting them.
        if pattern is None:
            jobs = self.jobs.select(state, None, after, limit + 1, queue=queue,
                                    schedule=schedule, before_id=before)
            return list_reply(jobs, limit, self.jobs.total(state, queue, schedule))
        # Answered in a later pass, as a `wait` is: later requests of conn wait for it.
        slot = [None]
        if not self.queries:
            self.loop.call_later(0, self.advance_queries)
        self.queries.append((conn, slot, PatternQuery(self.jobs, state, pattern, after,
                                                      limit + 1, queue, before, count=True,
                                                      schedule=schedule)))
        return slot

    def advance_queries(self) -> None:
        """Work on the pattern queries under way, QUERY_SLICE in all per pass, in turn."""
        deadline = time.monotonic() + QUERY_SLICE
        while self.queries and time.monotonic() < deadline:
            conn, slot, query = self.queries.pop(0)
            if conn.closed:
                continue
            if not query.step(deadline):
                self.queries.append((conn, slot, query))    # the others' turn first
                continue
            slot[0] = encode_reply(list_reply(query.jobs, query.limit - 1, query.total))
            self.this_pass.answered(conn)
        if self.queries:
            self.loop.call_later(0, self.advance_queries)

    def bulk_request(self, req: dict, conn: Connection, op: str) -> list:
        """`cancel`/`retry` with `where`: checked here, done in steps by advance_bulk() from
        this pass on (so that up to BULK_STEP jobs are one durable change with the request)."""
        if "id" in req:
            raise ProtocolError("bad_request", "give id or where, not both")
        where = req["where"]
        if not isinstance(where, dict):
            raise ProtocolError("bad_request", "where must be an object")
        check_fields(where, WHERE_FIELDS, "where: ")
        if not where:
            raise ProtocolError("bad_request", "where needs at least one of "
                                + ", ".join(WHERE_FIELDS))
        allowed = (BLOCKED, PENDING, RUNNING) if op == "cancel" else (FAILED, CANCELLED)
        states = allowed
        if "state" in where:
            if where["state"] not in allowed:
                raise ProtocolError("bad_request", "where: %s takes state %s"
                                    % (op, " or ".join(allowed)))
            states = (_CANONICAL_STATES[where["state"]],)
        pattern = get_pattern(where, "target", "where: ")
        queue = get_queue_name(where, "where: ") if "queue" in where else None
        schedule = get_schedule_name(where, "where: ") if "schedule" in where else None
        task = BulkChange(op, states, pattern, queue, [None], conn, conn.uid, schedule)
        self.bulk.append(task)
        return task.slot

    def advance_bulk(self) -> None:
        """Once per pass, after the requests: the next step of the oldest `where` under way
        (gathered, for a pattern, QUERY_SLICE at most per pass), changed in this pass's
        durable write; answered after its last step."""
        deadline = time.monotonic() + QUERY_SLICE
        while self.bulk:
            task = self.bulk[0]
            if not task.gather(self.jobs, deadline):
                return                          # its pattern query goes on next pass
            jobs = task.take()
            try:
                if task.op == "cancel":
                    self.cancel_many(jobs, task.uid)
                else:
                    self.retry_many(jobs, task.uid)
            except ProtocolError as exc:
                self.bulk.popleft()
                self.bulk_answer(task, encode_error(exc.code, "%s (after %d jobs in earlier "
                                                    "steps)" % (exc.message, len(task.ids))))
                return
            task.ids.extend(job.id for job in jobs)
            task.encoded.append(",".join([str(job.id) for job in jobs]).encode())
            self.this_pass.batch_slots.append(task.slot)     # this step's reply waits for it
            if task.done:
                self.bulk.popleft()
                self.bulk_answer(task, task.reply())
            return                              # one step per pass: the loop is not held

    def bulk_answer(self, task: BulkChange, reply: bytes) -> None:
        task.slot[0] = reply
        if task.conn is not None:
            self.this_pass.answered(task.conn)

    def bulk_committed(self, exc: OSError | None) -> None:
        """This pass's write is durable (exc None), or failed and was undone: a `where` under
        way stops at its last durable step and says so."""
        if exc is None:
            for task in self.bulk:
                task.durable = len(task.ids)
            return
        for task in self.bulk:
            del task.ids[task.durable:]
            self.bulk_answer(task, encode_error(
                "io_error", "the change could not be made durable (%s) after %d jobs were "
                "changed in earlier steps: %s" % (exc.strerror or exc, len(task.ids),
                                                  json.dumps(task.ids)[:1000])))
        self.bulk.clear()

    def cancel_many(self, jobs: list[Job], uid: int | None) -> None:
        self.jobs.cancel_many(jobs, uid)
        for job in jobs:
            att = self.attempts.get(job.id)
            if att is not None:
                self.this_pass.after_commit.append(lambda att=att: self.runner.stop(att, "cancel"))

    def retry_many(self, jobs: list[Job], uid: int | None) -> None:
        table = self.jobs
        keys = table.keys       # a job whose key another live job holds now stays as it is
        jobs = [job for job in jobs if job.key is None or keys.get(job.key, job.id) == job.id]
        self.check_room(len(jobs) + sum(table.descendants_to_retry(job) for job in jobs
                                        if job.id in table.children))
        table.retry_many(jobs, uid)

    def op_cancel(self, req: dict, conn: Connection) -> dict:
        if "where" in req:
            return self.bulk_request(req, conn, "cancel")
        job = self.find(req)
        if job.state not in LIVE:
            raise ProtocolError("invalid_state", "job %d is %s" % (job.id, job.state))
        att = self.attempts.get(job.id)
        self.jobs.transition(job, CANCELLED, uid=conn.uid)
        if att is not None:
            self.this_pass.after_commit.append(lambda: self.runner.stop(att, "cancel"))
        return {"job": job.record()}

    def op_retry(self, req: dict, conn: Connection) -> dict:
        if "where" in req:
            return self.bulk_request(req, conn, "retry")
        job = self.find(req)
        if job.state not in (FAILED, CANCELLED):
            raise ProtocolError("invalid_state", "job %d is %s; only failed or cancelled jobs "
                                "can be retried" % (job.id, job.state))
        if job.key is not None and self.jobs.keys.get(job.key, job.id) != job.id:
            raise ProtocolError("invalid_state", "job %d holds key %r now"
                                % (self.jobs.keys[job.key], job.key))
        self.check_room(1 + self.jobs.descendants_to_retry(job))
        self.jobs.retry(job, uid=conn.uid)
        return {"job": job.record()}

    def op_update(self, req: dict, conn: Connection) -> dict:
        """Priority, start time (`delay` or `run_at`) or queue of a blocked or pending job. A
        blocked job's `delay` counts from its unblocking (§2b), as at `add`."""
        job = self.find(req)
        changes = validate_update(req, self.cfg, self.clock(), job.state == BLOCKED)
        if job.state not in (BLOCKED, PENDING) or job.id in self.attempts:
            raise ProtocolError("invalid_state", "job %d is %s; only blocked or pending jobs "
                                "can be updated" % (job.id, "starting" if job.state == PENDING
                                                    else job.state))
        self.jobs.amend(job, changes)
        return {"job": job.record()}

    def op_wait(self, req: dict, conn: Connection):
        job = self.find(req)
        timeout = get_seconds(req, "timeout", None, 0.0, MAX_DELAY, nullable=True)
        if job.state in FINISHED:
            slot = [encode_reply({"job": job.record(), "done": True})]
            if job.id in self.this_pass.unsynced_ends or job in self.jobs.changed:
                self.this_pass.report_slots.append(slot)  # its end is not durable yet: this pass's
            return slot                         # commit makes it so first (or says it failed)
        if timeout == 0:
            return {"job": job.record(), "done": False}
        slot = [None]
        self.waits.add(job.id, conn, slot, timeout, self.wait_expired)
        return slot

    def wait_expired(self, job_id: int, entry: list) -> None:
        job = self.jobs.jobs.get(job_id)
        if job is not None and job.state in FINISHED:
            return          # it ended in this pass: the commit answers, once that is durable
        self.waits.answer(job_id, entry, encode_reply(
            {"job": job.record() if job else None, "done": False}))

    def op_output(self, req: dict, conn: Connection) -> dict:
        job = self.find(req)
        offset = get_int(req, "offset", 0, 0, 2 ** 62)
        limit = get_int(req, "limit", 65536, 1, MAX_OUTPUT_LIMIT)
        finished = job.state in FINISHED and job.id not in self.attempts
        try:
            fd = self.runner.open_output(job.id, os.O_RDONLY)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP):    # none, or not one we wrote
                raise
            size, data = 0, b""
        else:
            try:
                size = os.fstat(fd).st_size
                data = os.pread(fd, limit, offset)
                at_end = offset + len(data) >= size
                cut = utf8_prefix(data, finished and at_end)
                if not cut and data:            # limit smaller than one character
                    more = os.pread(fd, 4, offset)
                    cut = utf8_prefix(more, finished and offset + len(more) >= size) or more
                data = cut
            finally:
                os.close(fd)
        end = offset + len(data)
        return {"data": data.decode("utf-8", "replace"), "offset": end,
                "eof": finished and end >= size}

    def op_stats(self, req: dict, conn: Connection) -> dict:
        return {"counts": dict(self.jobs.counts),
                "workers": self.jobs.scheduler.default.workers,
                "paused": self.jobs.paused, "uptime": self.clock() - self.started,
                "protocol": PROTOCOL}

    def find_queue(self, req: dict) -> Queue:
        """The queue the request names: one the daemon knows (declared, or holding jobs)."""
        if "queue" not in req:
            raise ProtocolError("bad_request", "missing field 'queue'")
        name = get_queue_name(req)
        queue = self.jobs.scheduler.queues.get(name)
        if queue is None:
            raise ProtocolError("not_found", "no queue %r (not declared in the config)" % name)
        return queue

    def op_pause(self, req: dict, conn: Connection) -> dict:
        return self.switch(req, True)

    def op_resume(self, req: dict, conn: Connection) -> dict:
        return self.switch(req, False)

    def switch(self, req: dict, paused: bool) -> dict:
        """pause/resume: the whole daemon, or with `queue` that queue, or with `schedule`
        that schedule's fires (journaled either way)."""
        if "schedule" in req:
            if "queue" in req:
                raise ProtocolError("bad_request", "give queue or schedule, not both")
            self.daemon.schedules.set_paused(get_schedule_name(req), paused, self.clock())
        elif "queue" in req:
            queue = self.find_queue(req)
            if queue.paused != paused:
                self.jobs.set_paused(paused, queue.name)
        elif self.jobs.paused != paused:
            self.jobs.set_paused(paused)
        return {"paused": paused}

    def op_queues(self, req: dict, conn: Connection) -> dict:
        queues = self.jobs.scheduler.queues
        return {"queues": [queues[name].describe() for name in
                           sorted(queues, key=lambda name: (name != DEFAULT_QUEUE, name))]}

    def op_set_workers(self, req: dict, conn: Connection) -> dict:
        queue = self.find_queue(req)
        if "workers" not in req:
            raise ProtocolError("bad_request", "missing field 'workers'")
        # Not journaled: a restart or SIGHUP applies the config's value again (SPEC §2a).
        # Lowered, running attempts go on; fewer start until the queue is below it.
        queue.workers = get_int(req, "workers", None, 0, MAX_QUEUE_WORKERS)
        self.daemon.runner.trim_workers(queue)     # idle reused workers past it go (SPEC §2d)
        return {"queue": queue.describe()}

    def op_schedules(self, req: dict, conn: Connection) -> dict:
        return {"schedules": self.daemon.schedules.describe()}

    def op_trigger(self, req: dict, conn: Connection) -> dict:
        if "schedule" not in req:
            raise ProtocolError("bad_request", "missing field 'schedule'")
        job_id, created = self.daemon.schedules.trigger(get_schedule_name(req), self.clock(),
                                                        conn.uid)
        return {"id": job_id, "created": created}

    def op_metrics(self, req: dict, conn: Connection) -> dict:
        return {"text": self.daemon.metrics_text()}

    def op_activity(self, req: dict, conn: Connection) -> dict:
        """What `jobctl top` shows besides the queues: the running jobs (by the RUNNING index,
        at most ACTIVITY_RUNNING of them), the latest failed attempts and the jobs finished
        over the last minute (Metrics)."""
        jobs, ids = self.jobs.jobs, self.jobs.by_state[RUNNING]
        running = [jobs[i] for i in heapq.nsmallest(ACTIVITY_RUNNING, ids)]
        last_minute = self.metrics.finished_last_minute()
        return {"running": [{"id": j.id, "queue": j.queue, "target": j.target,
                             "method": j.method, "attempts": j.attempts,
                             "started_at": j.started_at} for j in running],
                "running_total": len(ids),
                "failures": list(reversed(self.metrics.failures)),
                "finished_last_minute": last_minute,
                "finished_per_second": last_minute / max(1.0, min(
                    float(RATE_WINDOW), self.clock() - self.started)),
                "now": self.clock()}

    def op_prune(self, req: dict, conn: Connection) -> list:
        older = get_seconds(req, "older_than", 0.0, 0.0, MAX_DELAY)
        task = PruneTask(self.clock() - older, [None], conn)
        self.prunes.append(task)            # done in steps by prune_some(), from this pass on
        return task.slot


HANDLERS = {
    "hello": Protocol.op_hello, "add": Protocol.op_add, "add_batch": Protocol.op_add_batch,
    "get": Protocol.op_get, "list": Protocol.op_list, "cancel": Protocol.op_cancel,
    "retry": Protocol.op_retry, "wait": Protocol.op_wait, "output": Protocol.op_output,
    "stats": Protocol.op_stats, "pause": Protocol.op_pause, "resume": Protocol.op_resume,
    "prune": Protocol.op_prune, "queues": Protocol.op_queues,
    "set_workers": Protocol.op_set_workers, "schedules": Protocol.op_schedules,
    "trigger": Protocol.op_trigger, "metrics": Protocol.op_metrics,
    "activity": Protocol.op_activity, "update": Protocol.op_update,
}
assert set(HANDLERS) == set(OP_FIELDS)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


####################################################################################################
#  main
####################################################################################################

def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(
        prog="jobrunnerd", description=__doc__.split("\n\n")[0],
        epilog="Config: TOML from --config, else $JOBRUNNER_CONFIG, else built-in defaults.")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--socket", help="socket path (overrides the config)")
    parser.add_argument("--workers", type=int, help="attempts running at once")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config, print the result and exit")
    parser.add_argument("--version", action="version", version="jobrunnerd " + VERSION)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config or os.environ.get("JOBRUNNER_CONFIG") or None,
                          {"socket": args.socket, "workers": args.workers})
    except ConfigError as exc:
        warn("%s" % exc)
        return 2
    if args.check_config:
        print("jobrunnerd: config OK")
        problem = fd_limit_problem(cfg)
        if problem:
            print("jobrunnerd: warning: " + problem)
        for key in CONFIG_KEYS:
            if key == "socket_mode":    # as it is written in a config file: 0o600
                print("  %s = %s" % (key, oct(cfg.socket_mode)))
            elif key != "schedules":
                print("  %s = %r" % (key, getattr(cfg, key)))
        now = wall_clock()
        for schedule in cfg.schedules.values():
            print("  schedule %s: %s" % (schedule.name, schedule.describe()))
            fire = now
            for _ in range(3):          # for `every`, counted from now, as a new schedule is
                fire = schedule.next_fire(fire, anchor=now)
                print("    next %s" % datetime.datetime.fromtimestamp(fire, schedule.zone)
                      .isoformat(timespec="seconds"))
        return 0
    STDERR.never_block()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a file past RLIMIT_FSIZE: EFBIG, not death
    keep_big_blocks_apart()
    daemon = Daemon(cfg)
    try:
        daemon.setup()
    except StateError as exc:
        warn("%s" % exc)
        say_shutdown("error: %s" % exc)
        return 1
    except OSError as exc:
        warn("cannot start: %s" % exc)
        say_shutdown("error: cannot start: %s" % exc)
        return 1
    STDERR.log = daemon.log         # from now on, that stderr fails is said in the errors log
    say_startup(cfg)
    if daemon.http is not None:
        say("jobrunnerd: metrics at http://%s/metrics" % daemon.http.bound)
    try:
        return daemon.run()
    except BaseException as exc:    # a bug that escaped every guard: say why we stop, once
        say_shutdown("error: %s: %s" % (type(exc).__name__, exc),
                     daemon.clock() - daemon.started)
        raise


if __name__ == "__main__":
    sys.exit(main())
