#!/usr/bin/env python3
"""jobctl: command line and Python client for the jobrunner daemon.

The daemon (jobrunnerd.py) listens on a Unix socket and speaks newline-delimited
JSON: one request object per line, one reply per line, replies in request order
(SPEC.md section 3 is the one definition of the protocol). This module is the
client side of that protocol and nothing more. It never imports jobrunnerd and
never imports job code.

Sections, in file order:

    constants       exit codes, defaults, each with its reason
    errors          JobrunnerError, DaemonUnreachable, ReplyTimeout, BadReply
    socket path     resolve_socket(): --socket, $JOBRUNNER_SOCKET, storage/, /run
    Client          one connection; call(), send()/recv() for pipelining and one
                    method per protocol op (hello, add, add_batch, get, list,
                    cancel, retry, wait, output, stats, pause, resume, prune,
                    queues, set_workers, schedules, trigger)
    helper          run_background_job(), the PHP runBackgroundJob() in Python
    rendering       relative times, the job table, "field: value" records
    commands        one cmd_* function per subcommand: argparse -> Client -> render
    top             the live view (curses imported only when it runs)
    web             the dashboard's HTTP server (http.server imported only when it runs)
    main            the argument parser and main(argv) -> exit code

Python use:

    from jobctl import Client, run_background_job
    job_id = run_background_job("examples.jobs:ExampleJob", "handle", 1, 0, 3, "a", "b")
    with Client() as c:
        print(c.wait(job_id)["job"]["state"])

Command line (run "jobctl -h" or "jobctl add -h" for details):

    jobctl add TARGET [ARG ...] [--method M] [--priority N] [--delay D | --at ISO8601]
               [--retries N] [--retry-delay D] [--backoff fixed|exponential]
               [--timeout D|none] [--key K] [--kwargs JSON] [--json-args]
               [--after ID ...] [--on-parent-failure cancel|run] [--wait]
    jobctl add --stdin          (one add object per JSON line, added in batches)
    jobctl list [--state S] [--target PATTERN] [--queue Q] [--schedule NAME] [--limit N]
                [--first | --after-id ID | --before-id ID | --all]
    jobctl show ID
    jobctl cancel ID ...        jobctl retry ID ...
    jobctl wait ID ... [--timeout D]
    jobctl logs ID [--follow] [--raw]
    jobctl stats                jobctl prune [--older-than D]
    jobctl pause [--queue Q | --schedule NAME]      jobctl resume [same]
    jobctl queues               jobctl workers QUEUE N
    jobctl schedules            jobctl trigger NAME
    jobctl completion bash|zsh  jobctl --version
    jobctl metrics              jobctl top [--once] [--interval D]
    jobctl web [--listen HOST:PORT]   (the dashboard: prints the URL to open)

A duration D is seconds (90, 1.5) or numbers with units, largest first: 250ms, 90s, 10m,
1h30m, 2d (parse_duration). `list` shows the newest 50 matching jobs, oldest of them first,
and a last line saying how many more match and how to page.
Global options --socket PATH and --json go before or after the subcommand. With --json
every command prints exactly one JSON document, also on refusal: the error reply
{"ok": false, "error": {...}}; a command over several ids prints an array in order.
Exit codes: 0 success, 1 a waited job ended failed or cancelled, 2 usage error or
the daemon refused the request, 3 the daemon cannot be reached, 4 --timeout passed
before a waited job finished (whatever the daemon does, wait --timeout D returns within
D + 5 s).

Limits: a reply must come within REPLY_TIMEOUT (30 s; $JOBRUNNER_REPLY_TIMEOUT sets other
seconds) and be one JSON object on a line of at most MAX_REPLY_BYTES (64 MiB), else the
Client raises ReplyTimeout or BadReply (both DaemonUnreachable: exit 3). In text output every
string that came from a user or the daemon goes through escape(): control characters are
shown as escapes (\x1b, \r), so a job's key or error cannot drive the terminal.
"""
from __future__ import annotations  # Client.list shadows the builtin in annotations

# Before anything that needs 3.11 (an import, a syntax, a call): one line and exit 2, never a
# traceback (SPEC section 4). ASCII and old syntax only, so that older Pythons get this far.
import sys
if sys.version_info < (3, 11):
    sys.stderr.write("jobctl: needs Python 3.11 or newer; found Python %d.%d.%d (%s)\n"
                     % (tuple(sys.version_info[:3]) + (sys.executable or "python",)))
    sys.exit(2)

import json
import os
import socket
import time
from collections import deque

__version__ = "0.1.0"   # the release; jobrunnerd.VERSION is the same (a test compares them)

__all__ = ["Client", "JobrunnerError", "DaemonUnreachable", "ReplyTimeout", "BadReply",
           "run_background_job", "resolve_socket", "escape", "main"]


###############################################################################
# Constants
###############################################################################

EXIT_OK = 0
EXIT_JOB_FAILED = 1       # a waited job ended failed or cancelled
EXIT_REFUSED = 2          # usage error, or the daemon answered with an error
EXIT_UNREACHABLE = 3      # no daemon on the socket (or the connection broke)
EXIT_TIMEOUT = 4          # --timeout passed before a waited job finished
# "Worst" order for commands over several ids: losing the daemon beats a refusal,
# which beats a timeout, which beats a failed job.
_EXIT_SEVERITY = (EXIT_OK, EXIT_JOB_FAILED, EXIT_TIMEOUT, EXIT_REFUSED, EXIT_UNREACHABLE)

DEFAULT_SOCKET = "/run/jobrunner/jobrunnerd.sock"   # systemd RuntimeDirectory=jobrunner
LOCAL_SOCKET = os.path.join("storage", "jobrunnerd.sock")  # a checkout's own daemon
SOCKET_ENV = "JOBRUNNER_SOCKET"

STATES = ("blocked", "pending", "running", "succeeded", "failed", "cancelled")  # display order for stats
FAILED_STATES = ("failed", "cancelled")  # a waited job that ended in one of these exits 1

_RECV_SIZE = 256 * 1024        # list replies can be ~1 MB; fewer syscalls
_SEND_DIRECT = 64 * 1024       # a write this small fits the socket buffer: sendall cannot deadlock
_SEND_BUFFER_MAX = 512 * 1024  # flush pipelined requests beyond this, bounding memory
_BATCH_JOBS = 1000             # add --stdin: jobs per add_batch request
_BATCH_BYTES = 768 * 1024      # ... and bytes per request, below max_request_bytes (1 MiB)
LIST_PAGE = 50                 # jobctl list: the newest 50 by default (SPEC §4), a screenful or two
LIST_MAX = 1000                # the daemon's largest `list` page (SPEC §3): --all reads pages of it
_FOLLOW_POLL = 0.5             # logs --follow: output has no push, wait() ends early when the job does
REPLY_TIMEOUT = 30.0           # SPEC §4: a daemon that accepted but says nothing for 30 s is unreachable
REPLY_TIMEOUT_ENV = "JOBRUNNER_REPLY_TIMEOUT"  # seconds instead of REPLY_TIMEOUT (tests, slow hosts)
MAX_REPLY_BYTES = 64 * 1024 * 1024  # SPEC §4: a longer reply line is a broken daemon, not data to buffer
WAIT_GRACE = 3.0               # a wait's reply may come this long after its timeout; SPEC allows D + 5 s
_WAIT_SLICE = 60.0             # a wait "until done" asks in slices, so a daemon that stops answering is seen

_OMIT = object()  # "argument not given" where None is a meaningful value (timeout: no limit)


###############################################################################
# Errors
###############################################################################

class JobrunnerError(Exception):
    """The daemon refused a request: .code is the protocol error code
    (bad_request, not_found, invalid_state, ...), .message its text."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class UsageError(SystemExit):
    """The command line is wrong (argparse's error): exit 2; .message says what."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code)
        self.message = message


class DaemonUnreachable(JobrunnerError):
    """No daemon answers on the socket, or the connection broke or timed out
    (code "unreachable", or "timeout" when the Client's read timeout passed)."""

    def __init__(self, message: str, code: str = "unreachable") -> None:
        super().__init__(code, message)


class ReplyTimeout(DaemonUnreachable):
    """The daemon accepted but its reply did not come within the Client's timeout
    (code "timeout"). The connection is closed; the next request opens a new one."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "timeout")


class BadReply(DaemonUnreachable):
    """The daemon sent something that is not a reply: not one JSON object on a line,
    a line over MAX_REPLY_BYTES, more replies than requests, or a reply without the
    fields its op promises (code "bad_reply")."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "bad_reply")


###############################################################################
# Socket path
###############################################################################

def resolve_socket(path: str | None = None) -> str:
    """The socket to use: `path` if given, else $JOBRUNNER_SOCKET, else
    storage/jobrunnerd.sock next to the real path of this file if it exists,
    else /run/jobrunner/jobrunnerd.sock."""
    if path:
        return path
    env = os.environ.get(SOCKET_ENV)
    if env:
        return env
    local = os.path.join(os.path.dirname(os.path.realpath(__file__)), LOCAL_SOCKET)
    if os.path.exists(local):
        return local
    return DEFAULT_SOCKET


###############################################################################
# Client
###############################################################################

def _encode(request: dict) -> bytes:
    """One request line. Non-ASCII is sent as UTF-8; lone surrogates (undecodable
    bytes in argv) fall back to JSON escapes rather than invalid UTF-8."""
    try:
        try:
            text = json.dumps(request, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            return text.encode("utf-8") + b"\n"
        except UnicodeEncodeError:
            return json.dumps(request, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"
    except (TypeError, ValueError) as e:
        raise JobrunnerError("bad_request", f"request is not JSON-serialisable: {e}") from None


class Client:
    """One connection to the daemon; a context manager that closes it.

    call(op, **fields) sends one request and returns the reply's fields (without
    "ok"), raising JobrunnerError when the daemon answers with an error. For
    pipelining, send() any number of requests and recv() their replies in the same
    order. The other methods are one per protocol op and return the interesting
    part of the reply. The connection is opened on first use and, after it breaks,
    reopened by the next request. Not thread-safe: use one Client per thread.

    Limits, so that a script never hangs or fills its memory whatever the daemon
    does: `timeout` (seconds; default REPLY_TIMEOUT, 30, or $JOBRUNNER_REPLY_TIMEOUT;
    None = no limit) bounds connecting and each whole reply, else ReplyTimeout.
    wait(id, timeout=T) allows T + WAIT_GRACE for its reply, and wait(id) without a
    timeout asks in slices of _WAIT_SLICE, so a daemon that stops answering is
    noticed there too. A reply line over MAX_REPLY_BYTES (64 MiB), one that is not
    a JSON object, or one without the fields its op returns raises BadReply. Both
    are DaemonUnreachable (exit 3 in jobctl); the connection is closed after them.
    """

    def __init__(self, socket_path: str | None = None, timeout: float | None | object = _OMIT) -> None:
        self.socket_path = resolve_socket(socket_path)
        self.timeout = reply_timeout() if timeout is _OMIT else timeout
        self._sock: socket.socket | None = None
        self._wbuf = bytearray()     # requests sent but not yet written
        self._rbuf = bytearray()     # bytes received but not yet parsed
        self._lines = 0              # complete reply lines in _rbuf
        self._tail = 0               # bytes in _rbuf after its last newline (a line in progress)
        self._pending: deque = deque()  # read timeout of each request awaiting its reply
        self._eof = False            # the daemon closed its end

    # -- connection -----------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; replies still pending are lost."""
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._wbuf.clear()
        self._rbuf.clear()
        self._lines = self._tail = 0
        self._pending.clear()
        self._eof = False

    def _connect(self, limit: float | None = None) -> socket.socket:
        """The connection, opened if needed within self.timeout (or `limit` if shorter)."""
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            timeout = self.timeout if limit is None or self.timeout is None else min(self.timeout, limit)
            try:
                sock.settimeout(timeout)
                sock.connect(self.socket_path)
            except TimeoutError:  # a full listen backlog: the daemon accepts nothing
                sock.close()
                raise ReplyTimeout(f"{self.socket_path} did not accept within {timeout}s") from None
            except OSError as e:
                sock.close()
                reason = e.strerror or str(e) or type(e).__name__
                raise DaemonUnreachable(f"cannot connect to {self.socket_path}: {reason}") from None
            self._sock = sock
        return self._sock

    def _broken(self, e: BaseException) -> DaemonUnreachable:
        self.close()
        if isinstance(e, TimeoutError):
            return ReplyTimeout(f"no reply from {self.socket_path} within {self.timeout}s")
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return DaemonUnreachable(f"connection to {self.socket_path} lost: {reason}")

    # -- framing --------------------------------------------------------------

    def send(self, op: str, **fields: object) -> None:
        """Queue one request without reading its reply (pipelining); recv() it later."""
        self._send({"op": op, **fields}, self.timeout)

    def _send(self, request: dict, read_timeout: float | None) -> None:
        line = _encode(request)
        self._connect()
        self._wbuf += line
        self._pending.append(read_timeout)
        if len(self._wbuf) > _SEND_BUFFER_MAX:
            self._flush()

    def _flush(self) -> None:
        """Write buffered requests. Large writes also read replies meanwhile, so a
        long pipeline cannot deadlock with a daemon that blocks writing replies."""
        if not self._wbuf or self._eof:
            self._wbuf.clear()
            return
        sock = self._sock
        try:
            sock.settimeout(self.timeout)
            if len(self._wbuf) <= _SEND_DIRECT:
                sock.sendall(self._wbuf)
            else:
                self._interleave(sock)
        except TimeoutError as e:
            raise self._broken(e) from None
        except BadReply:
            self.close()
            raise
        except OSError:
            # EPIPE/ECONNRESET: the daemon closed, maybe after a reply that says why
            # (too_large, busy). recv() reads what it sent before giving up.
            self._eof = True
        self._wbuf.clear()

    def _interleave(self, sock: socket.socket) -> None:
        import select
        view = memoryview(self._wbuf)
        try:
            pos = 0
            while pos < len(view):
                readable, writable, _ = select.select([sock], [sock], [], self.timeout)
                if not readable and not writable:
                    raise TimeoutError("send timed out")
                if readable:
                    chunk = sock.recv(_RECV_SIZE)
                    if not chunk:
                        self._eof = True
                        return
                    self._received(chunk)
                if writable:
                    try:
                        pos += sock.send(view[pos:pos + _SEND_DIRECT], socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        pass
        finally:
            view.release()

    def _received(self, chunk: bytes) -> None:
        """Buffer bytes from the daemon, refusing what no honest daemon sends: a line
        longer than MAX_REPLY_BYTES, or more replies than requests. Memory stays bounded
        by those limits however fast or long the daemon writes. The caller closes the
        connection after a BadReply (_interleave still holds a view of _wbuf here)."""
        last = chunk.rfind(b"\n")
        if last < 0:
            self._tail += len(chunk)
        else:
            longest = self._tail + chunk.find(b"\n")  # the line this chunk ends; the others are shorter than a chunk
            self._lines += chunk.count(b"\n")
            self._tail = len(chunk) - last - 1
            if longest > MAX_REPLY_BYTES:
                self._tail = longest
        if self._tail > MAX_REPLY_BYTES:
            raise BadReply(f"{self.socket_path} sent a reply line over {MAX_REPLY_BYTES} bytes")
        if self._lines > max(1, len(self._pending)):
            raise BadReply(f"{self.socket_path} sent more replies than requests")
        self._rbuf += chunk

    def _read_line(self, timeout: float | None) -> bytes:
        """The next reply line, which must be complete within `timeout` seconds."""
        import time
        deadline = None if timeout is None else time.monotonic() + timeout
        buf = self._rbuf
        while True:
            if self._lines:
                end = buf.find(b"\n")
                line = bytes(buf[:end])
                del buf[:end + 1]
                self._lines -= 1
                return line
            if self._eof:
                self.close()
                raise DaemonUnreachable(f"connection to {self.socket_path} closed by the daemon")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self.close()
                raise ReplyTimeout(f"no reply from {self.socket_path} within {timeout:.3g}s")
            try:
                self._sock.settimeout(left)
                chunk = self._sock.recv(_RECV_SIZE)
            except TimeoutError:
                continue  # the deadline check above says so
            except OSError as e:
                raise self._broken(e) from None
            if not chunk:
                self._eof = True
                continue
            try:
                self._received(chunk)
            except BadReply:
                self.close()
                raise

    def recv(self) -> dict:
        """Read the next reply (for the oldest request sent); return its fields
        without "ok", or raise JobrunnerError if it is an error reply (ReplyTimeout or
        BadReply when the daemon does not answer in time or not with a reply)."""
        if self._sock is None:
            raise DaemonUnreachable(f"not connected to {self.socket_path}")
        self._flush()
        timeout = self._pending[0] if self._pending else self.timeout
        line = self._read_line(timeout)
        if self._pending:
            self._pending.popleft()
        try:
            reply = json.loads(line, parse_constant=_no_constant)
        except (ValueError, RecursionError):  # RecursionError: [[[[... nested past the stack
            reply = None
        if not isinstance(reply, dict):
            self.close()  # the stream is out of step; nothing after this can be trusted
            raise BadReply(f"daemon sent something that is not a JSON object: {line[:200]!r}")
        if reply.pop("ok", False) is True:
            return reply
        error = reply.get("error")
        if not isinstance(error, dict):
            error = {}
        raise JobrunnerError(str(error.get("code", "unknown_error")), str(error.get("message", "")))

    def call(self, op: str, **fields: object) -> dict:
        """Send one request and return its reply's fields (without "ok")."""
        return self._call({"op": op, **fields}, self.timeout)

    def _call(self, request: dict, read_timeout: float | None) -> dict:
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} pipelined replies not yet recv()'d")
        self._send(request, read_timeout)
        return self.recv()

    # -- one method per op ----------------------------------------------------

    def hello(self) -> dict:
        """{"protocol": 1, "version": ...}"""
        return self.call("hello")

    def add(self, target: str, *, method: str | None = None, args: list | None = None,
            kwargs: dict | None = None, priority: int | None = None, delay: float | None = None,
            run_at: float | None = None, retries: int | None = None,
            retry_delay: float | None = None, backoff: str | None = None,
            timeout: float | None | object = _OMIT, key: str | None = None,
            queue: str | None = None, after: list[int] | None = None,
            on_parent_failure: str | None = None) -> dict:
        """Queue a job; return {"id": int, "created": bool}. Fields left None take the
        defaults of its queue ("default" unless given), then the daemon's; timeout=None is
        sent as null (no limit), omit it for the default. `after`: ids of jobs this one waits
        for; `on_parent_failure`: "cancel" or "run"."""
        fields = add_fields(target, method=method, args=args, kwargs=kwargs, priority=priority,
                            delay=delay, run_at=run_at, retries=retries, retry_delay=retry_delay,
                            backoff=backoff, timeout=timeout, key=key, queue=queue,
                            after=after or None, on_parent_failure=on_parent_failure)
        reply = self.call("add", **fields)
        _field(reply, "id", int)
        return reply

    def add_batch(self, jobs: list[dict]) -> list[int]:
        """Queue several jobs (add objects without "op"), all or nothing; return their ids."""
        return _field(self.call("add_batch", jobs=jobs), "ids", list, int)

    def get(self, id: int) -> dict:
        """The job record."""
        return _field(self.call("get", id=id), "job", dict)

    def list(self, state: str | None = None, target: str | None = None,
             limit: int | None = None, after_id: int | None = None,
             queue: str | None = None, schedule: str | None = None,
             order: str | None = None, before_id: int | None = None) -> list[dict]:
        """Job records in ascending id order, or newest first with order="desc" (from
        before_id, if given). The daemon's default limit is 100, at most 1000; list_page()
        also says whether more match and how many."""
        return self.list_page(state=state, target=target, limit=limit, after_id=after_id,
                              queue=queue, schedule=schedule, order=order,
                              before_id=before_id)["jobs"]

    def list_page(self, state: str | None = None, target: str | None = None,
                  limit: int | None = None, after_id: int | None = None,
                  queue: str | None = None, schedule: str | None = None,
                  order: str | None = None, before_id: int | None = None) -> dict:
        """One page of list(): {"jobs": [...], "more": bool (more match past this page),
        "total": int (how many match over all pages)}."""
        fields = _given(state=state, target=target, limit=limit, after_id=after_id, queue=queue,
                        schedule=schedule, order=order, before_id=before_id)
        reply = self.call("list", **fields)
        jobs = _field(reply, "jobs", list, dict)
        # A daemon from before `more` and `total` (protocol 1 still): this page is all it says.
        reply.setdefault("more", False)
        reply.setdefault("total", len(jobs))
        _field(reply, "more", bool)
        _field(reply, "total", int)
        return reply

    def cancel(self, id: int) -> dict:
        """Cancel a pending or running job; return the job record."""
        return _field(self.call("cancel", id=id), "job", dict)

    def retry(self, id: int) -> dict:
        """Put a failed or cancelled job back to pending; return the job record."""
        return _field(self.call("retry", id=id), "job", dict)

    def cancel_where(self, state: str | None = None, target: str | None = None,
                     queue: str | None = None, schedule: str | None = None) -> list[int]:
        """Cancel every live job that matches (at least one filter); return their ids."""
        where = _given(state=state, target=target, queue=queue, schedule=schedule)
        return _field(self.call("cancel", where=where), "ids", list, int)

    def retry_where(self, state: str | None = None, target: str | None = None,
                    queue: str | None = None, schedule: str | None = None) -> list[int]:
        """Put back every failed or cancelled job that matches; return their ids."""
        where = _given(state=state, target=target, queue=queue, schedule=schedule)
        return _field(self.call("retry", where=where), "ids", list, int)

    def update(self, id: int, *, priority: int | None = None, delay: float | None = None,
               run_at: float | None = None, queue: str | None = None) -> dict:
        """Change a blocked or pending job's priority, start time (delay or run_at) or queue;
        return the job record."""
        fields = _given(priority=priority, delay=delay, run_at=run_at, queue=queue)
        return _field(self.call("update", id=id, **fields), "job", dict)

    def wait(self, id: int, timeout: float | None = None) -> dict:
        """Block until the job is finished or `timeout` seconds pass (None: no limit);
        return {"job": record, "done": bool}. With a timeout it returns or raises
        within timeout + WAIT_GRACE (at most self.timeout), whatever the daemon does."""
        if self.timeout is None:
            reply = self._call({"op": "wait", "id": id, **_given(timeout=timeout)}, None)
        elif timeout is None:
            while True:  # slices: each one is answered in time by a daemon that is alive
                reply = self.wait(id, _WAIT_SLICE)
                if reply["done"]:
                    return reply
        else:
            import time
            allowed = timeout + min(WAIT_GRACE, self.timeout)
            deadline = time.monotonic() + allowed
            self._connect(allowed)  # connecting counts against the same deadline
            reply = self._call({"op": "wait", "id": id, "timeout": timeout},
                               max(0.0, deadline - time.monotonic()))
        _field(reply, "job", dict)
        _field(reply, "done", bool)
        return reply

    def output(self, id: int, offset: int = 0, limit: int | None = None) -> dict:
        """Captured output from byte `offset`: {"data": str, "offset": next, "eof": bool}."""
        reply = self.call("output", id=id, offset=offset, **_given(limit=limit))
        _field(reply, "data", str)
        _field(reply, "offset", int)
        _field(reply, "eof", bool)
        return reply

    def stats(self) -> dict:
        """{"counts": {state: n}, "workers", "paused", "uptime", "protocol"}"""
        reply = self.call("stats")
        _field(reply, "counts", dict)
        return reply

    def pause(self, queue: str | None = None, schedule: str | None = None) -> bool:
        """Start no new attempts (in `queue` alone, if given; or no fires of `schedule`) until
        resume(); return the paused flag (True)."""
        return _field(self.call("pause", **_given(queue=queue, schedule=schedule)), "paused", bool)

    def resume(self, queue: str | None = None, schedule: str | None = None) -> bool:
        """Start attempts again (in `queue` alone, if given; or fires of `schedule`); return
        the paused flag (False)."""
        return _field(self.call("resume", **_given(queue=queue, schedule=schedule)), "paused",
                      bool)

    def queues(self) -> list[dict]:
        """One object per queue: name, workers, running, paused, declared, isolation, counts."""
        return _field(self.call("queues"), "queues", list, dict)

    def set_workers(self, queue: str, workers: int) -> dict:
        """Give `queue` that many slots (until the daemon restarts or reloads); return the
        queue's object as queues() has it."""
        return _field(self.call("set_workers", queue=queue, workers=workers), "queue", dict)

    def schedules(self) -> list[dict]:
        """One object per schedule: name, cron or every, timezone, target, queue, paused,
        declared, next_run_at, last_run_at, last_job_id (and last_job_state)."""
        return _field(self.call("schedules"), "schedules", list, dict)

    def trigger(self, schedule: str) -> dict:
        """Queue a run of `schedule` now (its next fire stays): {"id", "created"}; created is
        False while its previous job is live and it does not overlap (that job's id)."""
        reply = self.call("trigger", schedule=schedule)
        _field(reply, "id", int)
        _field(reply, "created", bool)
        return reply

    def prune(self, older_than: float | None = None) -> int:
        """Delete finished jobs older than `older_than` seconds (default: all); return how many."""
        return _field(self.call("prune", **_given(older_than=older_than)), "removed", int)

    def metrics(self) -> str:
        """The Prometheus text exposition format (0.0.4) of the daemon's metrics."""
        return _field(self.call("metrics"), "text", str)

    def activity(self) -> dict:
        """What `top` shows: {"running": [...], "running_total", "failures": [...],
        "finished_last_minute", "finished_per_second", "now"}."""
        reply = self.call("activity")
        _field(reply, "running", list, dict)
        _field(reply, "failures", list, dict)
        return reply


def _given(**fields: object) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


def _field(reply: dict, name: str, kind: type, item: type | None = None):
    """reply[name], checked to be a `kind` (a list of `item`s), else BadReply: the
    callers and jobctl's rendering may then rely on its type."""
    value = reply.get(name)
    if not isinstance(value, kind) or (item is not None and not all(isinstance(v, item) for v in value)):
        raise BadReply(f"the daemon's reply has no valid {name!r} (a {type(value).__name__})")
    return value


def _no_constant(name: str) -> None:
    """json.loads(parse_constant=): NaN and Infinity are not JSON, and no daemon sends them."""
    raise ValueError(f"{name} is not JSON")


def reply_timeout() -> float:
    """The Client's default reply timeout: $JOBRUNNER_REPLY_TIMEOUT seconds, else REPLY_TIMEOUT."""
    text = os.environ.get(REPLY_TIMEOUT_ENV)
    if not text:
        return REPLY_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise JobrunnerError("bad_request", f"${REPLY_TIMEOUT_ENV}: not a number of seconds: {text!r}")
    return value


def add_fields(target: str, *, timeout: float | None | object = _OMIT, **fields: object) -> dict:
    """The `add` request fields (without "op"): those given, and timeout also when None."""
    out = {"target": target, **_given(**fields)}
    if timeout is not _OMIT:
        out["timeout"] = timeout
    return out


###############################################################################
# Helper: run_background_job, after the PHP runBackgroundJob()
###############################################################################

def target_name(obj: object) -> str:
    """The "module:Qualname" target of a class or function that a job process can
    import (defined at a module's top level, or nested in classes)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname:
        raise TypeError(f"cannot name {obj!r} as a job target: give 'module:Attr'")
    if module == "__main__" or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(f"{module}:{qualname} cannot be imported by a job process; "
                         "define it in an importable module")
    return f"{module}:{qualname}"


def run_background_job(target: str | type | object, method: str | None = "handle",
                       priority: int = 0, delay: float = 0, retries: int = 0, *args: object,
                       socket_path: str | None = None) -> int:
    """Queue a job and return its id, like PHP's
    runBackgroundJob($className, $method, $priority, $delay, $retryAttempts, ...$parameters).

    `target` is "package.module:Attr" or the class (or function) itself; a function
    is called directly, so no method is sent for it. `args` are the job's arguments.
    """
    if isinstance(target, type):
        target = target_name(target)
    elif callable(target):
        target, method = target_name(target), None
    with Client(socket_path) as client:
        return client.add(target, method=method, args=list(args), priority=priority,
                          delay=delay, retries=retries)["id"]


###############################################################################
# Rendering
###############################################################################

_ESCAPES: dict[int, str] = {}       # filled on first use: `jobctl add` prints only an id
_ESCAPES_KEEP_LINES: dict[int, str] = {}


def _escape_table(keep_lines: bool) -> dict[int, str]:
    if not _ESCAPES:
        controls = [*range(0x20), 0x7f, *range(0x80, 0xa0)]  # C0, DEL, C1
        _ESCAPES.update({c: f"\\x{c:02x}" for c in controls})
        _ESCAPES.update({0x09: "\\t", 0x0a: "\\n", 0x0d: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})
        _ESCAPES_KEEP_LINES.update(_ESCAPES)
        del _ESCAPES_KEEP_LINES[0x09], _ESCAPES_KEEP_LINES[0x0a]
    return _ESCAPES_KEEP_LINES if keep_lines else _ESCAPES


def escape(text: str, keep_lines: bool = False) -> str:
    """`text` safe for a terminal: control characters (C0, DEL, C1, U+2028/2029) shown
    as escapes ("\\x1b", "\\r", "\\n"), so a string from a job or another user cannot
    move the cursor, retitle the window or fake a line. `keep_lines` leaves newline and
    tab as they are (job output). Every user-supplied string in text output goes
    through here; --json output is escaped by _out_json instead."""
    if text.isprintable():  # the common case, and cheap: no control character in it
        return text
    return text.translate(_escape_table(keep_lines))


def relative_time(t: float, now: float | None = None) -> str:
    """An epoch time relative to now: "in 4s", "2m ago", "3h ago", "just now"."""
    if now is None:
        import time
        now = time.time()
    delta = t - now
    if abs(delta) < 1:
        return "just now"
    text = _span(abs(delta))
    return f"in {text}" if delta > 0 else f"{text} ago"


def _span(seconds: float) -> str:
    """Largest whole unit: 59s, 4m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def duration(seconds: float) -> str:
    """Two units for uptimes: "12s", "5m 3s", "1h 2m", "3d 4h"."""
    s = int(seconds)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {s % 60}s"
    return f"{s}s"


def local_time(t: float, now: float | None = None) -> str:
    """Local ISO time plus relative time: "2026-11-28T17:16:00+01:00 (2m ago)"."""
    from datetime import datetime
    try:
        stamp = datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):  # beyond what the platform's time functions take
        return str(t)
    return f"{stamp} ({relative_time(t, now)})"


def attempts_text(job: dict) -> str:
    """Attempts started out of those allowed: "1/4"."""
    retries = job.get("retries") or 0
    return f"{job.get('attempts', 0)}/{retries + 1 if isinstance(retries, int) else '?'}"


def _when(job: dict, now: float) -> str:
    # The one time that matters in each state: pending -> when it may run,
    # running -> since when, finished -> when it ended.
    state = job.get("state")
    if not isinstance(state, str):
        return "-"
    after = job.get("after")
    if state == "blocked" and isinstance(after, list) and after:    # what it waits for
        return "after " + ",".join(str(i) for i in after[:3]) + (",..." if len(after) > 3 else "")
    t = {"pending": job.get("run_at"), "running": job.get("started_at")}.get(state, job.get("finished_at"))
    return relative_time(t, now) if isinstance(t, (int, float)) else "-"


def elapsed(seconds: float) -> str:
    """A run time, short: "250ms", "4.2s", "5m 3s", "1h 2m"."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return duration(seconds)


def _time_column(job: dict, now: float) -> str:
    # Duration or time to start: pending -> when it may run, blocked -> what it waits for,
    # running -> for how long so far, finished -> how long its last attempt ran.
    state = job.get("state")
    started, finished = job.get("started_at"), job.get("finished_at")
    number = (int, float)
    if state == "pending":
        run_at = job.get("run_at")
        return _when(job, now) if isinstance(run_at, number) and run_at > now + 1 else "due"
    if state == "blocked":
        return _when(job, now)
    if state == "running" and isinstance(started, number):
        return elapsed(max(0.0, now - started))
    if isinstance(started, number) and isinstance(finished, number) and finished >= started:
        return elapsed(finished - started)
    return "-"


# SGR colours of the states on a terminal (never with NO_COLOR, never to a pipe or file).
_STATE_COLOURS = {"blocked": "35", "pending": "34", "running": "36", "succeeded": "32",
                  "failed": "31", "cancelled": "33"}
# To fit the terminal, the error column shrinks first, then the target, then both further:
# (column, narrowest) in turn; the other columns are short already.
_SHRINK = ((9, 16), (5, 24), (9, 5), (5, 12))


def on_a_terminal(stream=None) -> bool:
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def use_colour(stream=None) -> bool:
    """Colour only on a terminal, and not when $NO_COLOR is set (no-color.org)."""
    return not os.environ.get("NO_COLOR") and on_a_terminal(stream)


def table_width() -> int:
    """Columns a table may take: $COLUMNS, else the terminal's; no limit when stdout is not a
    terminal (`jobctl list | grep` sees whole targets and errors)."""
    import shutil
    text = os.environ.get("COLUMNS", "").strip()
    if (text.isdecimal() and int(text) > 0) or on_a_terminal():
        return shutil.get_terminal_size().columns
    return 1 << 30


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(0, width - 1)] + "\u2026"


def job_table(jobs: list[dict], now: float | None = None, width: int | None = None,
              colour: bool = False) -> str:
    """An aligned table, one row per job: ID STATE QUEUE PRI ATTEMPTS TARGET AGE TIME EXIT
    ERROR. Rows wider than `width` (default: the terminal's) shrink the error, then the
    target, to fit; `colour` paints the states."""
    import shutil
    if now is None:
        import time
        now = time.time()
    if width is None:
        width = table_width()
    number = (int, float)
    rows = [("ID", "STATE", "QUEUE", "PRI", "ATTEMPTS", "TARGET", "AGE", "TIME", "EXIT", "ERROR")]
    for j in jobs:
        target = str(j.get("target", ""))
        if j.get("method") not in (None, "handle"):
            target += f" ({j['method']})"
        created = j.get("created_at")
        exit_code = j.get("exit_code")
        error = str(j.get("error") or "-").strip().split("\n")[0]
        rows.append(tuple(escape(cell) for cell in (
            str(j.get("id")), str(j.get("state")), str(j.get("queue", "default")),
            str(j.get("priority", 0)), attempts_text(j), target,
            _span(max(0.0, now - created)) if isinstance(created, number) else "-",
            _time_column(j, now), "-" if exit_code is None else str(exit_code), error)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    over = sum(widths) + 2 * (len(widths) - 1) - width
    for column, least in _SHRINK:
        if over > 0 and widths[column] > least:
            cut = min(over, widths[column] - least)
            widths[column] -= cut
            over -= cut
    right = (True, False, False, True, False, False, True, False, True, False)  # numbers right
    lines = []
    for n, r in enumerate(rows):
        cells = [_clip(c, w).rjust(w) if rj else _clip(c, w).ljust(w)
                 for c, w, rj in zip(r, widths, right)]
        if colour and n and r[1] in _STATE_COLOURS:
            cells[1] = f"\x1b[{_STATE_COLOURS[r[1]]}m{cells[1]}\x1b[0m"
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


_JOB_FIELDS = ("id", "target", "method", "args", "kwargs", "priority", "state", "attempts",
               "retries", "retry_delay", "backoff", "timeout", "key", "queue", "after",
               "on_parent_failure", "schedule", "created_at", "run_at",
               "started_at", "finished_at", "pid", "exit_code", "error", "result")
_TIME_FIELDS = ("created_at", "run_at", "started_at", "finished_at")


def job_record(job: dict, now: float | None = None) -> str:
    """The job as "field: value" lines in SPEC order (then any other fields), times local."""
    lines = []
    for name in _JOB_FIELDS + tuple(sorted(set(job) - set(_JOB_FIELDS))):
        if name not in job:
            continue
        value = job[name]
        if value is None:
            text = "-"
        elif name in _TIME_FIELDS and isinstance(value, (int, float)):
            text = local_time(value, now)
        elif name == "attempts":
            text = attempts_text(job)
        elif name == "after" and isinstance(value, list):
            text = ", ".join(str(v) for v in value) or "-"
        elif isinstance(value, str) and name not in ("result", "args", "kwargs"):
            text = value
        else:
            text = json.dumps(value, ensure_ascii=False)
        lines.append(escape(f"{name}: {text}"))
    return "\n".join(lines)


def state_line(job: dict) -> str:
    """One line per job: "12 succeeded", "13 failed: RuntimeError: boom"."""
    line = f"{job.get('id')} {job.get('state')}"
    error = job.get("error")
    if error and (job.get("state") == "failed" or
                  job.get("state") == "cancelled" and str(error).startswith("parent ")):
        line += f": {error}"    # a job cancelled by its parent says which (SPEC §2b)
    return escape(line)


def _write(text: str) -> None:
    """Write to stdout as UTF-8 whatever the locale (job output, JSON with non-ASCII)."""
    buf = getattr(sys.stdout, "buffer", None)
    if buf is None:  # a StringIO in tests
        sys.stdout.write(text)
        return
    sys.stdout.flush()
    buf.write(text.encode("utf-8", "replace"))
    buf.flush()


def _out(text: str) -> None:
    _write(text + "\n")


_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in (0x7f, *range(0x80, 0xa0), 0x2028, 0x2029)}


def _out_json(doc: object) -> None:
    # One line: easy to read in a shell loop. json.dumps escapes C0 but leaves DEL, C1 and
    # U+2028/2029 raw without ensure_ascii; as \u escapes they are the same JSON value.
    _out(json.dumps(doc, ensure_ascii=False).translate(_JSON_ESCAPES))


# Hints for the codes where the next step is not obvious from the daemon's message.
_HINTS = {
    "unreachable": "is jobrunnerd running? --socket PATH or $JOBRUNNER_SOCKET names another socket",
    "forbidden": "this user is not in the daemon's allowed_uids/allowed_gids",
    "queue_full": "too many pending and running jobs (max_queued)",
    "busy": "too many connections (max_connections); try again",
    "timeout": f"the daemon accepted but did not answer: is it stopped or stuck? (${REPLY_TIMEOUT_ENV} "
               "sets the seconds to wait)",
    "bad_reply": "is --socket (or $JOBRUNNER_SOCKET) the socket of a jobrunnerd?",
}


def report(error: JobrunnerError, context: str = "") -> int:
    """The one place errors reach the user: print to stderr, return the exit code."""
    where = f"{context}: " if context else ""
    print(escape(f"jobctl: error: {where}{error.code}: {error.message}"), file=sys.stderr)
    if error.code in _HINTS:
        print(f"jobctl: hint: {_HINTS[error.code]}", file=sys.stderr)
    return EXIT_UNREACHABLE if isinstance(error, DaemonUnreachable) else EXIT_REFUSED


def error_doc(error: JobrunnerError) -> dict:
    """The error reply as the daemon sends it: {"ok": false, "error": {code, message}}."""
    return {"ok": False, "error": {"code": error.code, "message": error.message}}


def fail(ns, error: JobrunnerError, context: str = "") -> int:
    """report(), and with --json the error reply as the one document on stdout (SPEC §4:
    also a refusal prints exactly one JSON document)."""
    if getattr(ns, "json", False):
        _out_json(error_doc(error))
    return report(error, context)


def worst(codes: list[int]) -> int:
    """The exit code for a command over several ids."""
    return max(codes, key=_EXIT_SEVERITY.index, default=EXIT_OK)


###############################################################################
# Commands: argparse namespace -> Client calls -> output; each returns the exit code
###############################################################################

def cmd_add(client: Client, ns) -> int:
    if ns.stdin:
        return _add_stdin(client, ns)
    reply = client.add(ns.target, **ns.fields)
    if ns.json and not ns.wait:
        _out_json(reply)
    elif not ns.json:
        _out(str(reply["id"]))  # an int: Client.add checks
    if not ns.wait:
        return EXIT_OK
    job = client.wait(reply["id"])["job"]
    if ns.json:
        _out_json({**reply, "job": job})
    else:
        _out(state_line(job))
    return EXIT_JOB_FAILED if job.get("state") in FAILED_STATES else EXIT_OK


def _add_stdin(client: Client, ns) -> int:
    jobs = []
    for n, line in enumerate(sys.stdin.buffer, 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except ValueError as e:
            return fail(ns, JobrunnerError("bad_request", f"stdin line {n}: not JSON: {e}"))
        if not isinstance(job, dict):
            return fail(ns, JobrunnerError("bad_request", f"stdin line {n}: not a JSON object"))
        jobs.append((job, len(line)))
    ids: list[int] = []
    chunk: list[dict] = []
    size = 0
    for i, (job, length) in enumerate(jobs):
        chunk.append(job)
        size += length
        last = i == len(jobs) - 1
        if not (last or len(chunk) >= _BATCH_JOBS or size + jobs[i + 1][1] > _BATCH_BYTES):
            continue
        try:
            new = client.add_batch(chunk)
        except JobrunnerError as e:
            code = fail(ns, e, f"jobs {len(ids) + 1}-{len(ids) + len(chunk)} of {len(jobs)}")
            if ids:
                print(f"jobctl: {len(ids)} jobs were added before the error", file=sys.stderr)
            return code
        ids += new
        if not ns.json:
            _write("".join(f"{job_id}\n" for job_id in new))  # ints: Client.add_batch checks
        chunk, size = [], 0
    if ns.json:
        _out_json({"ids": ids})
    return EXIT_OK


def cmd_list(client: Client, ns) -> int:
    """Newest LIST_PAGE matching jobs by default (shown oldest of them first); --first and
    --after-id page oldest first, --before-id newest first, --all reads every page. A last
    line says how many match when this is not all of them, and how to see the others."""
    filters = dict(state=ns.state, target=ns.target, queue=ns.queue, schedule=ns.schedule)
    limit = ns.limit or LIST_PAGE
    if ns.all:
        jobs, after = [], 0
        while True:
            page = client.list_page(**filters, limit=LIST_MAX, after_id=after)
            jobs += page["jobs"]
            if not page["more"] or not page["jobs"]:
                break
            after = page["jobs"][-1]["id"]
    elif ns.first or ns.after_id is not None:
        page = client.list_page(**filters, limit=limit, after_id=ns.after_id)
        jobs = page["jobs"]
    else:
        page = client.list_page(**filters, limit=limit, order="desc", before_id=ns.before_id)
        jobs = page["jobs"][::-1]
    if ns.json:
        _out_json(jobs)
        return EXIT_OK
    if jobs:
        _out(job_table(jobs, colour=use_colour()))
    total = page["total"]
    if total > len(jobs):
        ascending = ns.first or ns.after_id is not None
        hints = []
        if jobs and (page["more"] if not ascending else bool(ns.after_id)):
            hints.append(f"older: --before-id {jobs[0]['id']}")
        if jobs and (page["more"] if ascending else ns.before_id is not None):
            hints.append(f"newer: --after-id {jobs[-1]['id']}")
        if not jobs:
            hints.append("the newest: without --after-id/--before-id")
        hints += ["the oldest: --first", "every one: --all"]
        _out(f"{len(jobs)} of {total} matching jobs shown ({total - len(jobs)} more); "
             + ", ".join(hints))
    return EXIT_OK


def cmd_show(client: Client, ns) -> int:
    job = client.get(ns.id)
    if ns.json:
        _out_json(job)
    else:
        _out(job_record(job))
    return EXIT_OK


def _replies(ns, fetch, codes: list, docs: list):
    """Yield the reply fetch(id) for each of ns.ids, in order. A refused id is
    reported (stderr, its exit code in `codes`, its error in `docs`) and skipped;
    DaemonUnreachable goes to the caller."""
    for job_id in ns.ids:
        try:
            reply = fetch(job_id)
        except DaemonUnreachable:
            raise
        except JobrunnerError as e:
            codes.append(report(e, str(job_id)))
            docs.append({**error_doc(e), "id": job_id})
            continue
        docs.append(reply)
        yield reply


def _each_id(client: Client, ns, op: str) -> int:
    """cancel/retry: pipeline one request per id, report each, exit with the worst code."""
    for job_id in ns.ids:
        client.send(op, id=job_id)
    codes, docs = [], []
    try:
        for reply in _replies(ns, lambda job_id: client.recv(), codes, docs):
            if not ns.json:
                _out(state_line(_field(reply, "job", dict)))
    except DaemonUnreachable as e:
        return fail(ns, e)
    _out_docs(ns, docs)
    return worst(codes)


def _out_docs(ns, docs: list[dict]) -> None:
    """--json for commands over ids: an array of the replies for several ids (a refused
    one is {"ok": false, "error": ..., "id": ID}), the reply for one (the error reply if
    it was refused; the error is on stderr too)."""
    if not ns.json:
        return
    if len(ns.ids) > 1:
        _out_json(docs)
    elif "error" in docs[0]:
        _out_json(error_doc(JobrunnerError(docs[0]["error"]["code"], docs[0]["error"]["message"])))
    else:
        _out_json(docs[0])


def _where(client: Client, ns, op: str) -> int:
    """cancel/retry by --state/--target/--queue/--schedule: one request, the ids it changed."""
    fields = dict(state=ns.state, target=ns.target, queue=ns.queue, schedule=ns.schedule)
    ids = (client.cancel_where if op == "cancel" else client.retry_where)(**fields)
    if ns.json:
        _out_json({"ok": True, "ids": ids})
    else:
        done = "cancelled" if op == "cancel" else "retried"
        _out(f"{len(ids)} job{'s' if len(ids) != 1 else ''} {done}"
             + (": " + " ".join(map(str, ids)) if ids else ""))
    return EXIT_OK


def _ids_or_where(client: Client, ns, op: str) -> int:
    if ns.ids:
        return _each_id(client, ns, op)
    return _where(client, ns, op)


def cmd_cancel(client: Client, ns) -> int:
    return _ids_or_where(client, ns, "cancel")


def cmd_retry(client: Client, ns) -> int:
    return _ids_or_where(client, ns, "retry")


def cmd_update(client: Client, ns) -> int:
    job = client.update(ns.id, priority=ns.priority, delay=ns.delay, run_at=ns.run_at,
                        queue=ns.queue)
    if ns.json:
        _out_json({"ok": True, "job": job})
    else:
        _out(job_record(job))
    return EXIT_OK


def cmd_wait(client: Client, ns) -> int:
    """One deadline for all ids; each wait gets the time that is left."""
    import time
    deadline = None if ns.timeout is None else time.monotonic() + ns.timeout
    codes, docs = [], []

    def wait(job_id):
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        return client.wait(job_id, timeout=remaining)

    try:
        for reply in _replies(ns, wait, codes, docs):
            job = reply["job"]
            if not reply.get("done"):
                codes.append(EXIT_TIMEOUT)
            elif job.get("state") in FAILED_STATES:
                codes.append(EXIT_JOB_FAILED)
            if not ns.json:
                _out(state_line(job) + ("" if reply.get("done") else " (not finished)"))
    except ReplyTimeout as e:
        # The daemon did not answer a wait in time: its deadline has passed (exit 4), and
        # another wait would only go past it further.
        code = fail(ns, e)
        return worst(codes + [EXIT_TIMEOUT]) if deadline is not None else code
    except DaemonUnreachable as e:
        return fail(ns, e)
    _out_docs(ns, docs)
    return worst(codes)


def cmd_logs(client: Client, ns) -> int:
    # On a terminal the output is escaped (a job must not drive it); to a pipe or file,
    # or with --raw, it goes as it is.
    escaped = not ns.json and not ns.raw and sys.stdout.isatty()
    offset, eof, parts = 0, False, []
    finished = False  # the job has ended: one more read gets the rest, then stop
    while True:
        reply = client.output(ns.id, offset=offset)
        if reply["data"] and reply["offset"] <= offset:  # the same bytes again: it would never end
            raise BadReply(f"output of job {ns.id}: data without progress past offset {offset}")
        data, offset, eof = reply.get("data", ""), reply.get("offset", offset), reply.get("eof", False)
        if ns.json:
            parts.append(data)
        elif data:
            _write(escape(data, keep_lines=True) if escaped else data)
        if eof or (not data and (not ns.follow or finished)):
            break
        if not data:
            finished = client.wait(ns.id, timeout=_FOLLOW_POLL)["done"]
    if ns.json:
        _out_json({"data": "".join(parts), "offset": offset, "eof": eof})
    return EXIT_OK


def cmd_stats(client: Client, ns) -> int:
    stats = client.stats()
    if ns.json:
        _out_json(stats)
        return EXIT_OK
    counts = stats.get("counts", {})
    lines = [f"{s}: {counts[s]}" for s in STATES if s in counts]
    lines += [f"{s}: {n}" for s, n in sorted(counts.items()) if s not in STATES]
    lines.append(f"workers: {stats.get('workers')}")
    lines.append(f"paused: {'yes' if stats.get('paused') else 'no'}")
    if isinstance(stats.get("uptime"), (int, float)):
        lines.append(f"uptime: {duration(stats['uptime'])}")
    if "protocol" in stats:
        lines.append(f"protocol: {stats['protocol']}")
    _out("\n".join(escape(line) for line in lines))
    return EXIT_OK


def _paused(ns, paused: bool) -> int:
    if ns.json:
        _out_json({"paused": paused})
    else:
        _out("paused" if paused else "not paused")
    return EXIT_OK


def cmd_pause(client: Client, ns) -> int:
    return _paused(ns, client.pause(ns.queue, ns.schedule))


def cmd_resume(client: Client, ns) -> int:
    return _paused(ns, client.resume(ns.queue, ns.schedule))


def _at(t: object, now: float) -> str:
    """A fire time in local time, then how far: "2026-12-07 03:30 CET (in 3h12m)"."""
    from datetime import datetime
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return "-"
    try:
        stamp = datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    except (OverflowError, OSError, ValueError):
        return str(t)
    delta = t - now
    if abs(delta) < 1:
        return f"{stamp} (just now)"
    span = duration(abs(delta)).replace(" ", "")
    return f"{stamp} ({'in ' + span if delta > 0 else span + ' ago'})"


def schedule_table(schedules: list[dict], now: float | None = None) -> str:
    """An aligned table: NAME EXPRESSION ZONE NEXT RUN LAST RUN (job, state) PAUSED."""
    if now is None:
        import time
        now = time.time()
    rows = [("NAME", "EXPRESSION", "ZONE", "NEXT RUN", "LAST RUN", "PAUSED")]
    for s in schedules:
        if s.get("cron") is not None:
            expression = f"cron {s['cron']}"
        elif s.get("every") is not None:
            expression = f"every {s['every']:g}s" if isinstance(s["every"], (int, float)) \
                else f"every {s['every']}"
        else:
            expression = "-"
        last = _at(s.get("last_run_at"), now)
        if s.get("last_job_id") is not None:
            last += f" job {s['last_job_id']} {s.get('last_job_state') or 'pruned'}"
        paused = "yes" if s.get("paused") else "no"
        if s.get("declared") is False:
            paused += " (undeclared)"
        rows.append(tuple(escape(str(cell)) for cell in (
            s.get("name"), expression, s.get("timezone") or "-", _at(s.get("next_run_at"), now),
            last, paused)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_schedules(client: Client, ns) -> int:
    schedules = client.schedules()
    if ns.json:
        _out_json({"schedules": schedules})
    elif schedules:
        _out(schedule_table(schedules))
    else:
        _out("no schedules: declare them as [schedules.NAME] tables in the config")
    return EXIT_OK


def cmd_trigger(client: Client, ns) -> int:
    reply = client.trigger(ns.name)
    if ns.json:
        _out_json(reply)
    else:
        _out(str(reply["id"]))
        if not reply["created"]:
            sys.stderr.write(escape(f"jobctl: nothing queued: job {reply['id']} of schedule "
                                    f"{ns.name} is still live (it does not overlap)") + "\n")
    return EXIT_OK


def queue_table(queues: list[dict]) -> str:
    """An aligned table: QUEUE WORKERS (used/total) PAUSED, then the counts per state."""
    states = list(STATES) + sorted({s for q in queues for s in q.get("counts", {})} - set(STATES))
    rows = [("QUEUE", "WORKERS", "PAUSED") + tuple(s.upper() for s in states)]
    for q in queues:
        paused = "yes" if q.get("paused") else "no"
        if q.get("declared") is False:
            paused += " (undeclared)"
        counts = q.get("counts", {}) if isinstance(q.get("counts"), dict) else {}
        rows.append(tuple(escape(str(cell)) for cell in (
            q.get("name"), f"{q.get('running')}/{q.get('workers')}", paused,
            *(counts.get(s, 0) for s in states))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i >= 3 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)


def cmd_queues(client: Client, ns) -> int:
    queues = client.queues()
    if ns.json:
        _out_json({"queues": queues})
    else:
        _out(queue_table(queues))
    return EXIT_OK


def cmd_workers(client: Client, ns) -> int:
    queue = client.set_workers(ns.queue, ns.workers)
    if ns.json:
        _out_json({"queue": queue})
    else:
        _out(queue_table([queue]))
    return EXIT_OK


def cmd_prune(client: Client, ns) -> int:
    removed = client.prune(older_than=ns.older_than)
    if ns.json:
        _out_json({"removed": removed})
    else:
        _out(f"removed {removed}")
    return EXIT_OK


def cmd_metrics(client: Client, ns) -> int:
    text = client.metrics()
    if ns.json:
        _out_json({"text": text})
    else:
        _write(escape(text, keep_lines=True))
    return EXIT_OK


def cmd_top(client: Client, ns) -> int:
    return top_run(client, ns)


def cmd_web(ns) -> int:
    return web_run(ns)


def completion_script(shell: str) -> str:
    """A completion script for bash or zsh (zsh runs the bash one through bashcompinit),
    made from the argument parser itself, so that every command and flag is in it."""
    import argparse
    import shlex
    parser = build_parser()
    words = lambda items: shlex.quote(" ".join(items))  # noqa: E731
    flags, values = {}, {}
    for name, sub in parser.commands.items():
        flags[name] = sorted({o for a in sub._actions for o in a.option_strings
                              if o.startswith("--") and a.help is not argparse.SUPPRESS}
                             | {"--socket", "--json", "--help"})
        for a in sub._actions:
            if a.option_strings and a.choices:
                values.update({o: a.choices for o in a.option_strings})
    positional = {"completion": ("bash", "zsh"), "pause": (), "resume": ()}
    top = sorted(parser.commands) + ["--socket", "--json", "--version", "--help"]
    lines = [
        f"# jobctl completion for {shell}: eval \"$(jobctl completion {shell})\" in ~/.{shell}rc",
        *(["autoload -U +X bashcompinit && bashcompinit"] if shell == "zsh" else []),
        "_jobctl() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" cmd="" i',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        case "${COMP_WORDS[i]}" in',
        "            --socket) ((i++)) ;;",
        "            -*) ;;",
        '            *) cmd="${COMP_WORDS[i]}"; break ;;',
        "        esac",
        "    done",
        '    case "$prev" in',
        '        --socket) COMPREPLY=($(compgen -f -- "$cur")); return ;;',
        *(f'        {o}) COMPREPLY=($(compgen -W {words(c)} -- "$cur")); return ;;'
          for o, c in sorted(values.items())),
        "    esac",
        '    case "$cmd" in',
        f'        "") COMPREPLY=($(compgen -W {words(top)} -- "$cur")) ;;',
        *(f'        {name}) COMPREPLY=($(compgen -W {words(list(positional.get(name, ())) + f)} '
          '-- "$cur")) ;;' for name, f in sorted(flags.items())),
        "    esac",
        "}",
        "complete -F _jobctl jobctl jobctl.py",
    ]
    return "\n".join(lines)


def cmd_completion(ns) -> int:
    if ns.json:
        _out_json({"script": completion_script(ns.shell)})
    else:
        _out(completion_script(ns.shell))
    return EXIT_OK


# Commands that need no daemon: they run without a Client.
LOCAL_COMMANDS = {"completion": cmd_completion, "web": cmd_web}

COMMANDS = {"add": cmd_add, "list": cmd_list, "show": cmd_show, "cancel": cmd_cancel,
            "retry": cmd_retry, "wait": cmd_wait, "logs": cmd_logs, "stats": cmd_stats,
            "pause": cmd_pause, "resume": cmd_resume, "prune": cmd_prune,
            "queues": cmd_queues, "workers": cmd_workers, "schedules": cmd_schedules,
            "trigger": cmd_trigger, "metrics": cmd_metrics, "top": cmd_top,
            "update": cmd_update}


###############################################################################
# Argument parsing and main
###############################################################################

_DURATION_UNITS = (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001))
_DURATION_HELP = "seconds (90, 1.5) or with units, largest first: 250ms, 90s, 10m, 1h30m, 2d"


def parse_duration(text: str) -> float:
    """A duration in seconds (SPEC §4): "90", "1.5", or numbers with units, each unit at most
    once and largest first: "250ms", "90s", "10m", "1h30m", "2d". ValueError otherwise."""
    import re
    number = r"(\d+(?:\.\d+)?|\.\d+)"
    word = text.strip().lower()
    if re.fullmatch(number + r"|\d+\.", word):
        value = float(word)
    else:
        # One optional group per unit, in order: "1h30m" matches, "30m1h" and "1h1h" do not.
        pattern = "".join(f"(?:{number}{unit})?" for unit, _ in _DURATION_UNITS)
        found = re.fullmatch(pattern, word) if word else None
        if found is None:
            raise ValueError(f"not a duration: {text!r} ({_DURATION_HELP})")
        value = sum(float(n) * size for n, (_, size) in zip(found.groups(), _DURATION_UNITS)
                    if n is not None)
    if value == float("inf"):
        raise ValueError(f"duration too large: {text!r}")
    return value


def _seconds(text: str) -> float:
    """Every CLI flag that takes seconds takes a duration (parse_duration)."""
    import argparse
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(text: str) -> int:
    """workers N: a whole number >= 0."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a whole number >= 0: {text!r}")
    return value


def _page_size(text: str) -> int:
    """list --limit: 1 to LIST_MAX."""
    import argparse
    value = _count(text)
    if not 1 <= value <= LIST_MAX:
        raise argparse.ArgumentTypeError(f"not between 1 and {LIST_MAX}: {text!r}")
    return value


def _job_id(text: str) -> int:
    """A job id: a whole number >= 1."""
    import argparse
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a job id: {text!r}")
    return value


def _timeout_or_none(text: str) -> float | None:
    """add --timeout: seconds, or "none" for no limit (sent as null)."""
    return None if text.lower() == "none" else _seconds(text)


def _iso_time(text: str) -> float:
    """--at: ISO 8601; without a zone it is local time. Returns epoch seconds."""
    import argparse
    from datetime import datetime
    try:
        return datetime.fromisoformat(text).timestamp()  # naive -> local time
    except (ValueError, OverflowError, OSError):
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None


class _Unbuilt:
    """Takes the arguments of a subcommand that is not on the command line: building
    all eleven subparsers (gettext looks for translations for each of their strings)
    would cost `jobctl add` several milliseconds for nothing."""

    def add_argument(self, *args, **kwargs) -> None:
        pass

    def add_mutually_exclusive_group(self, **kwargs) -> _Unbuilt:
        return self


def command_in(argv: list[str]) -> str | None:
    """The subcommand argv names, found past the global --socket PATH and --json as
    argparse will find it; None if it is not plainly there (then every subparser is
    built, and argparse says what is wrong)."""
    i = 0
    while i < len(argv):
        if argv[i] == "--socket":
            i += 2
        elif argv[i] == "--json" or argv[i].startswith("--socket="):
            i += 1
        else:
            return argv[i] if argv[i] in _command_names() else None
    return None


def _command_names() -> tuple:
    return (*COMMANDS, *LOCAL_COMMANDS)


def build_parser(only: str | None = None):
    """The argparse parser, with every subcommand or `only` the one given. --socket and
    --json are accepted before and after the subcommand: the subparsers repeat them with
    SUPPRESS defaults so they do not overwrite a value given before."""
    import argparse

    class Parser(argparse.ArgumentParser):
        """Usage errors quote argv ("unrecognized arguments: ..."): escaped like all text."""

        def _print_message(self, message: str, file=None) -> None:
            super()._print_message(escape(message, keep_lines=True) if message else message, file)

        def error(self, message: str):
            self.print_usage(sys.stderr)
            self.exit(EXIT_REFUSED, f"{self.prog}: error: {message}\n", message)

        def exit(self, status: int = 0, message: str | None = None, error: str | None = None):
            if message:
                self._print_message(message, sys.stderr)
            raise UsageError(status, error) if error is not None else SystemExit(status)

    parser = Parser(
        prog="jobctl", description="Queue and inspect jobrunner jobs.",
        epilog="exit codes: 0 ok, 1 waited job failed/cancelled, 2 usage error or refused, "
               "3 daemon unreachable, 4 --timeout passed")
    parser.add_argument("--socket", metavar="PATH", help="daemon socket (default: $JOBRUNNER_SOCKET, "
                        "./storage/jobrunnerd.sock next to jobctl.py, /run/jobrunner/jobrunnerd.sock)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--version", action="version", version=f"jobctl {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    parser.commands = {}  # name -> subparser, for errors found after parsing

    def command(name: str, help: str, **kw):
        if only is not None and name != only:
            return _Unbuilt()
        p = parser.commands[name] = sub.add_parser(name, parents=[common], help=help,
                                                   description=help, **kw)
        return p

    p = command("add", "queue a job; print its id", usage="%(prog)s TARGET [ARG ...] [options]\n"
                "       %(prog)s --stdin [--json] < jobs.jsonl")
    p.add_argument("target", nargs="?", metavar="TARGET", help="package.module:Attr")
    p.add_argument("args", nargs="*", metavar="ARG", help="job arguments (strings unless --json-args; "
                   "put -- before arguments that start with -)")
    p.add_argument("--method", metavar="M", help="method of a class target (default: handle)")
    p.add_argument("--priority", type=int, metavar="N", help="higher runs first (default 0)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--delay", type=_seconds, metavar="D", help="run no sooner than D from now (90, 10m, 1h30m)")
    when.add_argument("--at", type=_iso_time, metavar="ISO8601", dest="run_at",
                      help="run no sooner than this time (local time unless it has a zone)")
    p.add_argument("--retries", type=int, metavar="N", help="retries after a failed first attempt")
    p.add_argument("--retry-delay", type=_seconds, metavar="D", help="time before a retry (90, 10m)")
    p.add_argument("--backoff", choices=("fixed", "exponential"))
    p.add_argument("--timeout", type=_timeout_or_none, default=_OMIT, metavar="D",
                   help="how long an attempt may run (90, 10m, 1h), or 'none' for no limit")
    p.add_argument("--key", metavar="K", help="uniqueness key: while a job with it is pending or "
                   "running, its id is returned instead")
    p.add_argument("--kwargs", metavar="JSON", help="keyword arguments as a JSON object")
    p.add_argument("--json-args", action="store_true", help="parse each ARG as JSON")
    p.add_argument("--queue", metavar="Q", help="the queue to run in (declared in the config; "
                   "default: default)")
    p.add_argument("--after", nargs="+", action="extend", metavar="ID", help="wait for these jobs "
                   "to end first (ARGs go before --after, or after --)")
    p.add_argument("--on-parent-failure", choices=("cancel", "run"), help="when a parent fails "
                   "or is cancelled: cancel this job too (default) or run it anyway")
    p.add_argument("--wait", action="store_true", help="wait for the job; exit 1 if it fails")
    p.add_argument("--stdin", action="store_true", help="read add objects, one JSON line each, "
                   "from stdin and add them in batches; print the ids")

    p = command("list", "list jobs: the newest 50 matching, oldest of them first")
    p.add_argument("--state", metavar="S", choices=STATES)
    p.add_argument("--target", metavar="PATTERN", help="fnmatch pattern")
    p.add_argument("--queue", metavar="Q", help="only the jobs of queue Q")
    p.add_argument("--schedule", metavar="NAME", help="only the jobs schedule NAME queued")
    p.add_argument("--limit", type=_page_size, metavar="N",
                   help=f"at most N jobs (default {LIST_PAGE}, at most {LIST_MAX})")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--first", action="store_true", help="the oldest matching jobs")
    where.add_argument("--after-id", type=_count, metavar="ID", help="the oldest jobs after ID")
    where.add_argument("--before-id", type=_job_id, metavar="ID", help="the newest jobs before ID")
    where.add_argument("--all", action="store_true", help="every matching job, oldest first")

    p = command("show", "show one job")
    p.add_argument("id", type=int, metavar="ID")
    for name, text, states in (
            ("cancel", "cancel blocked, pending or running jobs: by id, or every one that "
             "matches --state/--target/--queue/--schedule", ("blocked", "pending", "running")),
            ("retry", "put failed or cancelled jobs back in the queue: by id, or every one "
             "that matches --state/--target/--queue/--schedule", ("failed", "cancelled"))):
        p = command(name, text, usage=f"%(prog)s ID ...\n       %(prog)s --state S [--target P] "
                    "[--queue Q] [--schedule NAME]")
        p.add_argument("ids", type=int, nargs="*", metavar="ID")
        p.add_argument("--state", metavar="S", choices=states)
        p.add_argument("--target", metavar="PATTERN", help="fnmatch pattern")
        p.add_argument("--queue", metavar="Q")
        p.add_argument("--schedule", metavar="NAME")
    p = command("update", "change a blocked or pending job's priority, start time or queue")
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("--priority", type=int, metavar="N", help="higher runs first")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--delay", type=_seconds, metavar="S", help="run no sooner than S seconds "
                      "from now (for a blocked job: from when it is unblocked)")
    when.add_argument("--at", type=_iso_time, metavar="ISO8601", dest="run_at",
                      help="run no sooner than this time (local time unless it has a zone)")
    p.add_argument("--queue", metavar="Q", help="move it to queue Q (declared in the config)")
    p = command("wait", "wait until jobs finish; exit 1 if one failed or was cancelled")
    p.add_argument("ids", type=int, nargs="+", metavar="ID")
    p.add_argument("--timeout", type=_seconds, metavar="D", help="give up after D (90, 10m; exit 4)")
    p = command("logs", "print a job's output")
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.add_argument("--raw", action="store_true", help="write the output as it is, also to a terminal "
                   "(there control characters are otherwise shown escaped)")
    command("stats", "queue counts and daemon status")
    for name, text in (("pause", "start no new attempts (kept across restarts)"),
                       ("resume", "start attempts again")):
        which = command(name, text).add_mutually_exclusive_group()
        which.add_argument("--queue", metavar="Q", help="in queue Q alone")
        which.add_argument("--schedule", metavar="NAME", help="the fires of schedule NAME "
                           "(those missed while paused are not made up)")
    command("schedules", "each schedule: expression, zone, next and last run, paused")
    command("trigger", "queue a run of a schedule now (its next fire stays)").add_argument(
        "name", metavar="NAME")
    command("queues", "each queue: workers used/total, paused, counts per state")
    p = command("workers", "set a queue's worker slots (until the daemon restarts or reloads)")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("workers", type=_count, metavar="N")
    p = command("completion", "print a shell completion script (eval \"$(jobctl completion bash)\")")
    p.add_argument("shell", choices=("bash", "zsh"))
    p = command("prune", "delete finished jobs and their output")
    p.add_argument("--older-than", type=_seconds, metavar="D", help="only those finished D ago (90, 10m, 2d)")
    command("metrics", "the daemon's metrics in the Prometheus text format")
    p = command("top", "a live view of queues, running jobs and failures (q or Ctrl-C quits)")
    p.add_argument("--once", action="store_true", help="print one plain frame and exit")
    p.add_argument("--interval", type=_seconds, default=1.0, metavar="D",
                   help="time between refreshes (default 1 s; 250ms, 2s, ...)")
    p = command("web", "serve the dashboard on HTTP until Ctrl-C; print the URL to open")
    p.add_argument("--listen", default=WEB_LISTEN, metavar="HOST:PORT",
                   help=f"address to serve on (default {WEB_LISTEN}; port 0 picks a free one)")
    return parser


def parse_args(argv: list[str] | None = None):
    """Parse and check the command line; exits 2 (argparse) on a usage error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_in(argv))
    # Everything after the first "--" is an ARG, verbatim (argparse would drop a later "--").
    tail = argv[argv.index("--") + 1:] if "--" in argv else None
    ns, extra = parser.parse_known_args(argv if tail is None else argv[:argv.index("--")])
    if ns.command != "add":
        if tail is not None:
            ns, extra = parser.parse_known_args(argv)
        if extra:
            parser.commands[ns.command].error(f"unrecognized arguments: {' '.join(extra)}")
        if ns.command in ("cancel", "retry"):
            filters = [f"--{k}" for k in ("state", "target", "queue", "schedule")
                       if getattr(ns, k) is not None]
            if ns.ids and filters:
                parser.commands[ns.command].error(f"give ids or {', '.join(filters)}, not both")
            if not ns.ids and not filters:
                parser.commands[ns.command].error("give job ids, or --state S (and/or "
                                                  "--target, --queue, --schedule)")
        if ns.command == "update" and all(getattr(ns, k) is None for k in
                                          ("priority", "delay", "run_at", "queue")):
            parser.commands["update"].error("give at least one of --priority, --delay or "
                                            "--at, --queue")
        return ns
    error = parser.commands["add"].error
    # argparse stops filling TARGET/ARG at the first option, so "add T --priority 3 a b"
    # leaves "a b" over; they are ARGs. Only options (before a "--") are errors.
    positional = ([ns.target] if ns.target is not None else []) + ns.args
    # --after takes ids up to the first word that is not one: what follows are ARGs again
    # ("add T --after 3 4 x" is after=[3, 4], args=["x"]); a numeric ARG goes before --after.
    ids = []
    for n, word in enumerate(ns.after or ()):
        if not word.isdigit():
            if not ids:
                error(f"--after: {word!r} is not a job id")
            positional += ns.after[n:]
            break
        ids.append(int(word))
    ns.after = ids
    unknown, after_dashes = [], False
    for arg in extra:
        if arg == "--" and not after_dashes:
            after_dashes = True
        elif after_dashes or not arg.startswith("-") or arg == "-" or _is_number(arg):
            positional.append(arg)
        else:
            unknown.append(arg)
    if unknown:
        error(f"unrecognized arguments: {' '.join(unknown)}")
    positional += tail or []
    if ns.stdin:
        given = [o for o, v in (("TARGET", positional), ("--wait", ns.wait),
                                ("--json-args", ns.json_args), ("--kwargs", ns.kwargs),
                                ("--after", ns.after)) if v]
        given += [f"--{k.replace('_', '-')}" for k in ("method", "priority", "delay", "run_at", "retries",
                                                        "retry_delay", "backoff", "key", "queue",
                                                        "on_parent_failure")
                  if getattr(ns, k) is not None]
        if ns.timeout is not _OMIT:
            given.append("--timeout")
        if given:
            error(f"add --stdin takes each job from its line, not {', '.join(given)}")
        return ns
    if not positional:
        error("the following arguments are required: TARGET")
    ns.target, ns.args = positional[0], positional[1:]
    if ns.json_args:
        try:
            ns.args = [json.loads(a) for a in ns.args]
        except ValueError as e:
            error(f"--json-args: an ARG is not JSON: {e}")
    kwargs = None
    if ns.kwargs is not None:
        try:
            kwargs = json.loads(ns.kwargs)
        except ValueError as e:
            error(f"--kwargs: not JSON: {e}")
        if not isinstance(kwargs, dict):
            error("--kwargs: must be a JSON object")
    ns.fields = dict(method=ns.method, args=ns.args, kwargs=kwargs, priority=ns.priority,
                     delay=ns.delay, run_at=ns.run_at, retries=ns.retries,
                     retry_delay=ns.retry_delay, backoff=ns.backoff, timeout=ns.timeout, key=ns.key,
                     queue=ns.queue, after=ns.after, on_parent_failure=ns.on_parent_failure)
    return ns


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


###############################################################################
# top: a live view (SPEC §4). Its code runs only when `top` does, and curses is
# imported only there: `jobctl add` and the other commands never load it.
###############################################################################
#
# One frame is four questions to the daemon, each answered from counters and indexes (never a
# walk of the job table, also at 1M jobs): `stats` (uptime, the whole-daemon pause), `queues`
# (slots, pause, counts per state), `activity` (running jobs, latest failed attempts, jobs
# finished over the last minute) and `schedules` (next fires; a daemon without that op answers
# unknown_op, and the panel says so).
#
#     top_gather(client) -> dict          the four replies as one snapshot
#     top_frame(snap, now) -> [(text, style)]   the lines of one frame, styles by name
#     top_plain(lines, colour) -> str     a frame as text (ANSI colours only if asked)
#     top_run(client, ns) -> int          --once (or --json): one frame; else the curses loop
#
# The live view redraws the whole frame each interval and on a resize (KEY_RESIZE), cuts lines
# to the window, and quits on `q` or Ctrl-C.

TOP_MIN_INTERVAL = 0.1          # s: a smaller --interval would only load the daemon
TOP_SHOWN_RUNNING = 20          # rows of running jobs (the panel says how many more)
TOP_SHOWN_FAILURES = 10         # rows of the latest failed attempts
TOP_SHOWN_SCHEDULES = 10        # rows of next schedule fires
TOP_ANSI = {"title": "1", "head": "1", "bad": "31", "warn": "33", "good": "32", "dim": "2"}


def top_gather(client: Client) -> dict:
    """One snapshot of the daemon: stats, queues, activity and schedules (None with the
    reason when the daemon has no `schedules` op)."""
    snap = {"stats": client.stats(), "queues": client.queues(), "activity": client.activity()}
    try:
        snap["schedules"] = client.call("schedules").get("schedules")
        snap["schedules_error"] = None
    except JobrunnerError as e:
        if isinstance(e, DaemonUnreachable):
            raise
        snap["schedules"], snap["schedules_error"] = None, e.code
    return snap


def _top_table(rows: list[tuple], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def top_frame(snap: dict, now: float | None = None) -> list[tuple[str, str | None]]:
    """The lines of one frame, each (text, style name or None). Every string that came from
    a user or a job goes through escape()."""
    esc = escape
    now = time.time() if now is None else now
    stats, act = snap["stats"], snap["activity"]
    out: list[tuple[str, str | None]] = []
    title = "jobrunner top  %s  up %s  finished %.2f/s (last minute: %s)" % (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
        duration(float(stats.get("uptime") or 0)),
        float(act.get("finished_per_second") or 0), act.get("finished_last_minute", 0))
    if stats.get("paused"):
        title += "  PAUSED (whole daemon)"
    out.append((title, "title"))
    out.append(("", None))
    rows = [("QUEUE", "SLOTS", "PAUSED", *(s.upper() for s in STATES))]
    styles: list[str | None] = ["head"]
    for q in snap["queues"]:
        counts = q.get("counts") if isinstance(q.get("counts"), dict) else {}
        paused = "yes" if q.get("paused") else "no"
        if q.get("declared") is False:
            paused += " (undeclared)"
        rows.append((esc(str(q.get("name"))), "%s/%s" % (q.get("running"), q.get("workers")),
                     paused, *(str(counts.get(s, 0)) for s in STATES)))
        styles.append("warn" if q.get("paused") else "bad" if counts.get("failed") else None)
    out += list(zip(_top_table(rows, set(range(3, 3 + len(STATES)))), styles))
    out.append(("", None))
    running, total = act.get("running", []), act.get("running_total", 0)
    shown = running[:TOP_SHOWN_RUNNING]
    out.append(("RUNNING (%d)" % total + ("  %d more not shown" % (total - len(shown))
                                          if total > len(shown) else ""), "head"))
    if shown:
        rows = [("ID", "QUEUE", "ELAPSED", "TARGET")]
        for j in shown:
            target = str(j.get("target"))
            if j.get("method"):
                target += "." + str(j["method"])
            started = j.get("started_at")
            elapsed = duration(max(0.0, now - started)) if started else "-"
            rows.append((str(j.get("id")), esc(str(j.get("queue"))), elapsed, esc(target)))
        out += [(line, None) for line in _top_table(rows, {0, 2})]
    else:
        out.append(("  none", "dim"))
    out.append(("", None))
    failures = act.get("failures", [])[:TOP_SHOWN_FAILURES]
    out.append(("LATEST FAILURES", "head"))
    if failures:
        rows = [("ID", "WHEN", "QUEUE", "OUTCOME", "ERROR")]
        for f in failures:
            at = f.get("at")
            rows.append((str(f.get("id")), relative_time(at, now) if at else "-",
                         esc(str(f.get("queue"))), str(f.get("outcome")),
                         esc(str(f.get("error") or ""))))
        out += [(line, "bad" if i else None) for i, line in enumerate(_top_table(rows, {0}))]
    else:
        out.append(("  none since the daemon started", "dim"))
    out.append(("", None))
    out.append(("NEXT SCHEDULE FIRES", "head"))
    schedules = snap.get("schedules")
    if schedules is None:
        out.append(("  not known: this daemon has no schedules (%s)"
                    % snap.get("schedules_error"), "dim"))
    else:
        fires = sorted((s for s in schedules if isinstance(s, dict)),
                       key=lambda s: (s.get("next_run_at") is None, s.get("next_run_at") or 0))
        if not fires:
            out.append(("  none declared", "dim"))
        else:
            rows = [("SCHEDULE", "NEXT FIRE")]
            for s in fires[:TOP_SHOWN_SCHEDULES]:
                at = s.get("next_run_at")
                when = "-" if at is None else local_time(at, now)
                rows.append((esc(str(s.get("name"))), when + (" (paused)" if s.get("paused")
                                                               else "")))
            out += [(line, None) for line in _top_table(rows, set())]
    return out


def top_plain(lines: list[tuple[str, str | None]], colour: bool) -> str:
    """A frame as text; with `colour`, styled lines in TOP_ANSI colours."""
    if not colour:
        return "\n".join(text for text, _ in lines)
    return "\n".join("\x1b[%sm%s\x1b[0m" % (TOP_ANSI[style], text) if style else text
                     for text, style in lines)


def top_run(client: Client, ns) -> int:
    interval = max(TOP_MIN_INTERVAL, ns.interval)
    if ns.json:
        _out_json(top_gather(client))
        return EXIT_OK
    if ns.once or not (sys.stdout.isatty() and sys.stdin.isatty()):
        _out(top_plain(top_frame(top_gather(client)), use_colour(sys.stdout)))
        return EXIT_OK
    import curses
    try:
        return curses.wrapper(_top_live, client, interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _top_live(screen, client: Client, interval: float) -> int:
    import curses
    colour = not os.environ.get("NO_COLOR") and curses.has_colors()
    attrs = {"title": curses.A_BOLD, "head": curses.A_BOLD, "dim": curses.A_DIM}
    if colour:
        curses.use_default_colors()
        for n, (style, fg) in enumerate((("bad", curses.COLOR_RED),
                                         ("warn", curses.COLOR_YELLOW),
                                         ("good", curses.COLOR_GREEN)), start=1):
            curses.init_pair(n, fg, -1)
            attrs[style] = curses.color_pair(n)
    try:
        curses.curs_set(0)
    except curses.error:
        pass                            # a terminal that cannot hide the cursor
    screen.timeout(int(interval * 1000))
    lines: list[tuple[str, str | None]] = []
    fetched = 0.0
    while True:
        if time.monotonic() - fetched >= interval:
            fetched = time.monotonic()
            try:
                lines = top_frame(top_gather(client))
            except DaemonUnreachable as e:   # shown, and asked again next interval
                lines = [("jobrunner top: %s" % escape(e.message), "bad"),
                         ("  trying again every %gs; q quits" % interval, "dim")]
                client.close()
        height, width = screen.getmaxyx()
        screen.erase()
        for y, (text, style) in enumerate(lines[:max(0, height - 1)]):
            try:
                screen.addnstr(y, 0, text, max(0, width - 1), attrs.get(style, 0))
            except curses.error:
                pass                    # the window shrank meanwhile: the next draw fits
        try:
            screen.addnstr(height - 1, 0, "q quits, refreshed every %gs" % interval,
                           max(0, width - 1), curses.A_DIM)
        except curses.error:
            pass
        screen.refresh()
        key = screen.getch()            # waits up to the interval; a resize wakes it
        if key in (ord("q"), ord("Q")):
            return EXIT_OK
        if key == curses.KEY_RESIZE:
            curses.update_lines_cols()


###############################################################################
# web: the dashboard (SPEC §4), a small HTTP server that talks to the daemon through the
# socket like any other client. Its code runs only when `web` does: http.server, secrets,
# threading and the rest are imported there, so `jobctl add` never loads an HTTP server.
###############################################################################
#
# One concern each:
#
#     WebApp          one request in, one response out: the Host check, the token, the routes,
#                     the JSON API (one or a few Client calls each) and the files of web/
#     DaemonPool      a few Clients to the daemon, shared by the request threads under a lock
#     web_server()    the HTTP side (http.server.ThreadingHTTPServer): a thread per connection
#     web_run(ns)     `jobctl web`: parse --listen, start, print the URL, serve until stopped
#
# Why threads and not a selectors loop: every daemon call is a blocking Client call, and with
# a thread per connection a slow client (or a slow daemon reply) holds only its own thread.
# What bounds them: at most WEB_MAX_CONNECTIONS at once (the next get a 503 at once), a socket
# timeout that sends silent and idle connections away (WEB_IDLE_TIMEOUT), and a reaper that
# closes a connection whose client takes longer than WEB_CLIENT_DEADLINE to send one request
# or to read one reply (headers trickled a byte at a time would dodge the socket timeout).
#
# Safety (README "Dashboard" says what this does and does not protect against): the token
# (secrets.token_urlsafe) in ?token=, the HttpOnly SameSite=Strict cookie set from it, or the
# X-Jobrunner-Token header, compared in constant time; POST alone changes anything, and only
# with the header (a cookie that another site's form would send is not enough); the Host header
# must name this server (DNS rebinding); a strict Content-Security-Policy (no inline script);
# the page puts every string from the daemon in with textContent.

WEB_LISTEN = "127.0.0.1:8765"     # SPEC §4: loopback unless told otherwise
WEB_MAX_CONNECTIONS = 64          # threads at once; a browser opens about 6 per server
WEB_IDLE_TIMEOUT = 10.0           # s a connection may stay silent (keep-alive, or nothing sent)
WEB_CLIENT_DEADLINE = 30.0        # s to send one whole request, and to read one whole reply
WEB_MAX_BODY = 64 * 1024          # a POST body: the largest action is a `where` filter
WEB_DAEMON_TIMEOUT = 10.0         # s for a daemon reply: the page shows a 502, it does not hang
WEB_BULK_TIMEOUT = 600.0          # s for cancel/retry of a filter: 1M jobs take the daemon ~10 s
WEB_POOL_IDLE = 4                 # daemon connections kept open between requests
WEB_LIST_LIMIT = 50               # /api/list: jobs per page unless ?limit= says
WEB_COOKIE = "jobrunner_token"
WEB_TOKEN_HEADER = "X-Jobrunner-Token"
WEB_STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
              "/index.html": ("index.html", "text/html; charset=utf-8"),
              "/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/app.css": ("app.css", "text/css; charset=utf-8")}
WEB_TOKEN_MARK = "{{TOKEN}}"      # index.html's placeholder: the page reads the token from it
# Every response: no inline script or style, nothing from another origin, no framing; the
# token is in the page's URL, so no Referer carries it away.
WEB_HEADERS = (("Content-Security-Policy",
                "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                "frame-ancestors 'none'"),
               ("X-Content-Type-Options", "nosniff"),
               ("Referrer-Policy", "no-referrer"),
               ("X-Frame-Options", "DENY"))
# HTTP status of a daemon's error reply (the body is that reply); any other code: 400.
WEB_ERROR_STATUS = {"not_found": 404, "invalid_state": 409, "too_large": 413,
                    "not_allowed": 403, "forbidden": 403, "queue_full": 503, "busy": 503,
                    "shutting_down": 503, "io_error": 503}
# The fields each action takes from its JSON body (the daemon checks their values).
WEB_ACTIONS = {"/api/cancel": ("cancel", ("id", "where")),
               "/api/retry": ("retry", ("id", "where")),
               "/api/update": ("update", ("id", "priority", "delay", "run_at", "queue")),
               "/api/pause": ("pause", ("queue", "schedule")),
               "/api/resume": ("resume", ("queue", "schedule")),
               "/api/trigger": ("trigger", ("name",))}
WEB_LIST_PARAMS = ("state", "queue", "target", "schedule", "before_id", "after_id", "limit")


class WebError(Exception):
    """A request the dashboard refuses: HTTP `status`, and the error body's code and message."""

    def __init__(self, status: int, code: str, message: str, allow: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.allow = status, code, message, allow


class DaemonPool:
    """Clients to the daemon for the request threads: get() one (idle or new), put() it back.
    At most WEB_POOL_IDLE stay open between requests; a Client whose connection broke
    reconnects by itself on its next call."""

    def __init__(self, socket_path: str, timeout: float = WEB_DAEMON_TIMEOUT) -> None:
        import threading
        self.socket_path, self.timeout = socket_path, timeout
        self._idle: list[Client] = []
        self._lock = threading.Lock()

    def get(self) -> Client:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return Client(self.socket_path, timeout=self.timeout)

    def put(self, client: Client, clean: bool = True) -> None:
        """Give `client` back; one that failed mid-way (`clean` false) is closed, since
        replies to it may still be on their way."""
        client.timeout = self.timeout
        if clean:
            with self._lock:
                if len(self._idle) < WEB_POOL_IDLE:
                    self._idle.append(client)
                    return
        client.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()


class WebApp:
    """The dashboard's requests, without the HTTP plumbing: respond(method, target, headers,
    body) -> (status, headers, body bytes). `hosts` are the Host header values allowed
    (lower case); a Host that is an IP literal is allowed too when `any_ip` (a server on a
    wildcard address: no DNS name, so no rebinding). `static` maps file names of web/ to
    their bytes."""

    def __init__(self, token: str, static: dict[str, bytes], pool: DaemonPool) -> None:
        self.token, self.static, self.pool = token, static, pool
        self.hosts: set[str] = set()
        self.any_ip, self.port = False, 0
        self.cookie = WEB_COOKIE            # jobrunner_token_PORT once listening(): browsers
                                            # send a host's cookies to all its ports, so two
                                            # dashboards (two ports) must not share one name

    def listening(self, host: str, port: int) -> str:
        """Set the Host values allowed for a server bound to (host, port); return its URL.
        On a wildcard address (0.0.0.0, ::) the URL names the loopback address, and this
        machine's name and any IP literal are allowed besides the loopback names."""
        import socket as socket_module
        self.port, self.any_ip = port, host in ("0.0.0.0", "::")
        self.cookie = f"{WEB_COOKIE}_{port}"
        shown = ("127.0.0.1" if host == "0.0.0.0" else "::1") if self.any_ip else host
        names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host}
        if self.any_ip:
            names |= {socket_module.gethostname().lower(), socket_module.getfqdn().lower()}
        self.hosts = {f"{n}:{port}" for n in names} | (names if port == 80 else set())
        return f"http://{'[%s]' % shown if ':' in shown else shown}:{port}/?token={self.token}"

    # -- the checks, in order: Host, token, method ------------------------------

    def host_allowed(self, host: str | None) -> bool:
        if not host:
            return False
        host = host.strip().lower()
        if host in self.hosts:
            return True
        if not self.any_ip:
            return False
        import ipaddress
        name, _, port = host.rpartition(":")
        if port != str(self.port):
            return False
        try:
            ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
        except ValueError:
            return False
        return True

    def _token_in(self, query: dict, headers, header_only: bool) -> bool:
        import hmac
        given = [headers.get(WEB_TOKEN_HEADER)]
        if not header_only:
            given += query.get("token", []) + [_cookie(headers.get("Cookie"), self.cookie)]
        return any(isinstance(g, str) and hmac.compare_digest(g.encode(), self.token.encode())
                   for g in given)

    def respond(self, method: str, target: str, headers, body: bytes | None = None
                ) -> tuple[int, list[tuple[str, str]], bytes]:
        """The response to one request; never raises for anything a client sends."""
        from urllib.parse import parse_qs, urlsplit
        try:
            if not self.host_allowed(headers.get("Host")):
                raise WebError(403, "forbidden", "the Host header does not name this server "
                               "(open the URL jobctl web printed)")
            try:
                parts = urlsplit(target)
            except ValueError as e:                 # e.g. "http://[::1/": not a URL
                raise WebError(400, "bad_request", f"request target: {e}") from None
            path = parts.path
            try:
                query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False,
                                 max_num_fields=32)
            except ValueError as e:
                raise WebError(400, "bad_request", f"query: {e}") from None
            if not self._token_in(query, headers, header_only=False):
                raise WebError(403, "forbidden", "no valid token: open the URL jobctl web "
                               "printed (it ends in ?token=...)")
            if path in WEB_ACTIONS:
                if method != "POST":
                    raise WebError(405, "bad_request", f"{path} changes something: POST only",
                                   allow="POST")
                if not self._token_in(query, headers, header_only=True):
                    raise WebError(403, "forbidden", f"a POST needs the {WEB_TOKEN_HEADER} "
                                   "header (the cookie alone is not enough)")
                return self._json(200, self._action(path, headers, body))
            if path in WEB_STATIC or path in WEB_GETS:
                if method != "GET":
                    raise WebError(405, "bad_request", f"{path}: GET only", allow="GET")
                if path in WEB_STATIC:
                    return self._file(path, query)
                return self._json(200, WEB_GETS[path](self, _one_values(query)))
            raise WebError(404, "not_found", f"no such page: {path}")
        except WebError as e:
            status, headers, body = self._json(e.status, {"ok": False, "error": {
                "code": e.code, "message": e.message}})
            return status, headers + ([("Allow", e.allow)] if e.allow else []), body
        except DaemonUnreachable as e:
            return self._json(502, error_doc(e))
        except JobrunnerError as e:
            return self._json(WEB_ERROR_STATUS.get(e.code, 400), error_doc(e))

    # -- responses ---------------------------------------------------------------

    def _json(self, status: int, doc: dict) -> tuple[int, list[tuple[str, str]], bytes]:
        body = json.dumps(doc, separators=(",", ":")).encode()
        return status, [("Content-Type", "application/json"), ("Cache-Control", "no-store")], body

    def _file(self, path: str, query: dict) -> tuple[int, list[tuple[str, str]], bytes]:
        name, kind = WEB_STATIC[path]
        headers = [("Content-Type", kind), ("Cache-Control", "no-store")]
        body = self.static[name]
        if name == "index.html":
            body = body.replace(WEB_TOKEN_MARK.encode(), self.token.encode())
            if self._token_in(query, {}, header_only=False):   # the URL's token: the cookie
                headers.append(("Set-Cookie", f"{self.cookie}={self.token}; HttpOnly; "
                                              "SameSite=Strict; Path=/"))
        return 200, headers, body

    def _call(self, op: str, timeout: float | None = None, **fields: object) -> dict:
        client, clean = self.pool.get(), False
        try:
            if timeout is not None:
                client.timeout = timeout
            reply = client.call(op, **fields)
            clean = True
            return {"ok": True, **reply}
        except JobrunnerError as e:
            clean = not isinstance(e, DaemonUnreachable)
            raise
        finally:
            self.pool.put(client, clean)

    # -- the API -----------------------------------------------------------------

    def api_overview(self, params: dict) -> dict:
        """stats, queues, schedules and activity, pipelined on one connection: one round trip.
        A daemon without `schedules` gives null there."""
        _no_params(params, ())
        client, clean = self.pool.get(), False
        try:
            ops = ("stats", "queues", "schedules", "activity")
            for op in ops:
                client.send(op)
            doc: dict = {"ok": True}
            error = None
            for op in ops:
                try:
                    reply = client.recv()
                except DaemonUnreachable:
                    raise
                except JobrunnerError as e:     # read the other replies all the same
                    if op != "schedules" and error is None:
                        error = e
                    reply = None
                doc[op] = reply if reply is None or op in ("stats", "activity") else reply[op]
            clean = True
            if error is not None:
                raise error
            return doc
        finally:
            self.pool.put(client, clean)

    def api_list(self, params: dict) -> dict:
        """A page of jobs newest first: from the newest, or older than before_id, or (the
        "newer" button) the oldest after after_id, turned round. `more`: more match past this
        page in the direction it was read."""
        _no_params(params, WEB_LIST_PARAMS)
        fields = {k: params[k] for k in ("state", "queue", "target", "schedule") if params.get(k)}
        fields["limit"] = _int_param(params, "limit", WEB_LIST_LIMIT)
        before, after = _int_param(params, "before_id"), _int_param(params, "after_id")
        if before is not None and after is not None:
            raise WebError(400, "bad_request", "give before_id or after_id, not both")
        if after is not None:
            reply = self._call("list", **fields, order="asc", after_id=after)
            reply["jobs"] = reply.get("jobs", [])[::-1]
        else:
            reply = self._call("list", **fields, order="desc",
                               **({} if before is None else {"before_id": before}))
        return reply

    def api_job(self, params: dict) -> dict:
        _no_params(params, ("id",))
        return self._call("get", id=_int_param(params, "id", required=True))

    def api_output(self, params: dict) -> dict:
        _no_params(params, ("id", "offset", "limit"))
        fields = {"id": _int_param(params, "id", required=True),
                  "offset": _int_param(params, "offset", 0)}
        if params.get("limit"):
            fields["limit"] = _int_param(params, "limit")
        return self._call("output", **fields)

    def _action(self, path: str, headers, body: bytes | None) -> dict:
        op, allowed = WEB_ACTIONS[path]
        kind = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise WebError(415, "bad_request", "a POST body is JSON: Content-Type: application/json")
        try:
            fields = json.loads(body or b"{}", parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise WebError(400, "bad_request", "the body is not JSON") from None
        if not isinstance(fields, dict):
            raise WebError(400, "bad_request", "the body must be a JSON object")
        unknown = sorted(set(fields) - set(allowed))
        if unknown:
            raise WebError(400, "bad_request", f"{path} takes {', '.join(allowed)}; not "
                           + ", ".join(map(repr, unknown)))
        if op == "trigger":
            if "name" not in fields:
                raise WebError(400, "bad_request", "/api/trigger needs the schedule's name")
            fields = {"schedule": fields["name"]}
        return self._call(op, WEB_BULK_TIMEOUT if "where" in fields else None, **fields)


WEB_GETS = {"/api/overview": WebApp.api_overview, "/api/list": WebApp.api_list,
            "/api/job": WebApp.api_job, "/api/output": WebApp.api_output}


def _cookie(header: str | None, name: str) -> str | None:
    for part in (header or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _one_values(query: dict) -> dict:
    """?a=1&b=2 as {"a": "1", "b": "2"}; the token is not a parameter of the API."""
    out = {}
    for key, values in query.items():
        if key == "token":
            continue
        if len(values) > 1:
            raise WebError(400, "bad_request", f"{key} is given {len(values)} times")
        out[key] = values[0]
    return out


def _no_params(params: dict, allowed: tuple) -> None:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise WebError(400, "bad_request", "unknown parameter " + ", ".join(map(repr, unknown))
                       + (f" (this takes {', '.join(allowed)})" if allowed else ""))


def _int_param(params: dict, name: str, default: int | None = None,
               required: bool = False) -> int | None:
    text = params.get(name)
    if not text:
        if required:
            raise WebError(400, "bad_request", f"missing parameter {name!r}")
        return default
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise WebError(400, "bad_request", f"{name} must be a whole number >= 0, not {text!r}")
    return int(text)


def parse_listen(text: str) -> tuple[str, int]:
    """--listen HOST:PORT ("127.0.0.1:8765", "[::1]:0", "localhost:8000", ":8765" for
    every address) -> (host, port); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {text!r}: give HOST:PORT, e.g. 127.0.0.1:8765 "
                         "(port 0 picks a free one)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"--listen {text!r}: brackets are for an IPv6 address")
    elif ":" in host:
        raise ValueError(f"--listen {text!r}: put an IPv6 address in brackets: [::1]:8765")
    if any(c.isspace() or c in "/?#@[]" for c in host):
        raise ValueError(f"--listen {text!r}: not a host name or address")
    return host or "0.0.0.0", int(port)


def web_static() -> dict[str, bytes]:
    """The files of web/ next to the real path of jobctl.py; OSError if one is missing."""
    folder = os.path.join(os.path.dirname(os.path.realpath(__file__)), "web")
    out = {}
    for name, _ in WEB_STATIC.values():
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def web_server(app: WebApp, host: str, port: int, max_connections: int = WEB_MAX_CONNECTIONS,
               idle_timeout: float = WEB_IDLE_TIMEOUT,
               client_deadline: float = WEB_CLIENT_DEADLINE):
    """A ThreadingHTTPServer bound to (host, port) that answers through `app`; OSError if it
    cannot bind. serve_forever() serves; server_close() stops the reaper and closes."""
    import http.server
    import socket as socket_module
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        """One connection (keep-alive): each request through WebApp.respond()."""
        protocol_version = "HTTP/1.1"
        server_version = "jobctl-web"
        sys_version = ""
        timeout = idle_timeout          # StreamRequestHandler: the socket's timeout
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed ACK

        def handle_one_request(self) -> None:
            self.server.watch(self.connection)      # from its first byte: the whole request
            try:
                super().handle_one_request()
            except OSError:             # the reaper shut it, or the peer left: done
                self.close_connection = True
            finally:
                self.server.unwatch(self.connection)

        def _serve(self) -> None:
            body = None
            if self.command == "POST":
                body = self._body()
                if body is None:
                    return
            elif self.command != "GET":
                self.close_connection = True    # a body we do not read would follow
            self.server.unwatch(self.connection)    # the daemon's time is not the client's
            try:
                status, headers, payload = app.respond(self.command, self.path, self.headers,
                                                       body)
            except Exception as e:      # a bug of ours: say so, answer, and serve on
                print(escape(f"jobctl web: internal error on {self.command} {self.path}: "
                             f"{type(e).__name__}: {e}"), file=sys.stderr)
                status, (headers, payload) = 500, _plain("internal error (see jobctl's stderr)")
            self._send(status, headers, payload)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve

        def do_HEAD(self) -> None:
            self._send(405, [("Content-Type", "text/plain")], b"")

        def _body(self) -> bytes | None:
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                self._send(411, *_plain("give the body with Content-Length"))
                return None
            length = self.headers.get("Content-Length") or "0"
            if not (length.isascii() and length.isdigit()):     # not "²": int() refuses it
                self.close_connection = True
                self._send(400, *_plain("bad Content-Length"))
                return None
            if int(length) > WEB_MAX_BODY:
                self.close_connection = True
                self._send(413, *_plain(f"a body is at most {WEB_MAX_BODY} bytes"))
                return None
            return self.rfile.read(int(length))

        def _send(self, status: int, headers: list, payload: bytes) -> None:
            self.server.watch(self.connection)      # reading the reply, too, has a deadline
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def end_headers(self) -> None:
            for name, value in WEB_HEADERS:   # also on http.server's own errors (400, 414)
                self.send_header(name, value)
            super().end_headers()

        def log_message(self, format: str, *args) -> None:
            pass                        # quiet: stdout is the URL, stderr is for problems

    class Server(http.server.ThreadingHTTPServer):
        """At most max_connections threads; the reaper shuts connections past their deadline."""
        daemon_threads = True           # a stop does not wait for clients
        address_family = (socket_module.AF_INET6 if ":" in host else socket_module.AF_INET)

        def __init__(self) -> None:
            self.slots = threading.BoundedSemaphore(max_connections)
            self.deadlines: dict = {}
            self.lock = threading.Lock()
            self.stopped = threading.Event()
            super().__init__((host, port), Handler)
            self.reaper = threading.Thread(target=self._reap, name="jobctl-web-reaper",
                                           daemon=True)
            self.reaper.start()

        def watch(self, conn) -> None:
            with self.lock:
                self.deadlines[conn] = time.monotonic() + client_deadline

        def unwatch(self, conn) -> None:
            with self.lock:
                self.deadlines.pop(conn, None)

        def _reap(self) -> None:
            while not self.stopped.wait(min(1.0, client_deadline / 4)):
                now = time.monotonic()
                with self.lock:
                    late = [c for c, d in self.deadlines.items() if d < now]
                    for conn in late:
                        del self.deadlines[conn]
                for conn in late:
                    try:
                        conn.shutdown(socket_module.SHUT_RDWR)   # its thread's recv/send end
                    except OSError:
                        pass

        def process_request(self, request, client_address) -> None:
            if not self.slots.acquire(blocking=False):
                try:                    # small enough for the socket buffer: never blocks
                    request.setblocking(False)
                    status, headers, payload = 503, *_plain("too many connections; try again")
                    request.send(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                                 b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(payload), payload))
                except OSError:
                    pass
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:      # no thread started (no memory): the slot is free again
                self.slots.release()
                self.shutdown_request(request)
                raise

        def process_request_thread(self, request, client_address) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.unwatch(request)
                self.slots.release()

        def handle_error(self, request, client_address) -> None:
            pass                        # a client that vanished mid-request is no news

        def server_close(self) -> None:
            self.stopped.set()
            super().server_close()

    return Server()


def _plain(text: str) -> tuple[list[tuple[str, str]], bytes]:
    return [("Content-Type", "text/plain; charset=utf-8")], text.encode() + b"\n"


def web_run(ns) -> int:
    """`jobctl web`: serve the dashboard until Ctrl-C or SIGTERM (then exit 0)."""
    import secrets
    import signal
    try:
        host, port = parse_listen(ns.listen)
    except ValueError as e:
        return fail(ns, JobrunnerError("bad_request", str(e)))
    try:
        static = web_static()
    except OSError as e:
        return fail(ns, JobrunnerError("not_found", f"the dashboard's files: {e.strerror}: "
                                                    f"{e.filename} (web/ goes next to jobctl.py)"))
    pool = DaemonPool(resolve_socket(ns.socket))
    app = WebApp(secrets.token_urlsafe(24), static, pool)
    try:
        server = web_server(app, host, port)
    except (OSError, OverflowError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        return fail(ns, JobrunnerError("bad_request", f"--listen {ns.listen}: {reason}"))
    url = app.listening(host, server.server_address[1])

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        if ns.json:
            _out_json({"url": url})
        else:
            _out(url)
        try:                            # a daemon that is down is worth saying, not fatal
            with Client(pool.socket_path, timeout=2.0) as probe:
                probe.hello()
        except JobrunnerError as e:
            print(escape(f"jobctl: warning: {e.message}; the page says so until the daemon "
                         "answers"), file=sys.stderr)
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        pool.close()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run one jobctl command; return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = argv[:argv.index("--")] if "--" in argv else argv
    if "--version" in options:
        if "--json" in options:
            _out_json({"version": __version__})
        else:
            _out(f"jobctl {__version__}")
        return EXIT_OK
    try:
        ns = parse_args(argv)
    except UsageError as e:  # with --json the error is also the one document on stdout
        if "--json" in options:
            _out_json(error_doc(JobrunnerError("bad_request", e.message)))
        return EXIT_REFUSED
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_REFUSED
    try:
        if ns.command in LOCAL_COMMANDS:
            return LOCAL_COMMANDS[ns.command](ns)
        with Client(ns.socket) as client:
            return COMMANDS[ns.command](client, ns)
    except JobrunnerError as e:
        return fail(ns, e)
    except KeyboardInterrupt:
        return 130  # the shell's convention for SIGINT
    except BrokenPipeError:  # "jobctl logs 3 | head": the reader left, that is fine
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
