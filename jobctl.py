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
                    cancel, retry, wait, output, stats, pause, resume, prune)
    helper          run_background_job(), the PHP runBackgroundJob() in Python
    rendering       relative times, the job table, "field: value" records
    commands        one cmd_* function per subcommand: argparse -> Client -> render
    main            the argument parser and main(argv) -> exit code

Python use:

    from jobctl import Client, run_background_job
    job_id = run_background_job("examples.jobs:ExampleJob", "handle", 1, 0, 3, "a", "b")
    with Client() as c:
        print(c.wait(job_id)["job"]["state"])

Command line (run "jobctl -h" or "jobctl add -h" for details):

    jobctl add TARGET [ARG ...] [--method M] [--priority N] [--delay S | --at ISO8601]
               [--retries N] [--retry-delay S] [--backoff fixed|exponential]
               [--timeout S|none] [--key K] [--kwargs JSON] [--json-args]
               [--after ID ...] [--on-parent-failure cancel|run] [--wait]
    jobctl add --stdin          (one add object per JSON line, added in batches)
    jobctl list [--state S] [--target PATTERN] [--limit N]
    jobctl show ID
    jobctl cancel ID ...        jobctl retry ID ...
    jobctl wait ID ... [--timeout S]
    jobctl logs ID [--follow] [--raw]
    jobctl stats                jobctl pause     jobctl resume     jobctl prune [--older-than S]

Global options --socket PATH and --json go before or after the subcommand.
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

import json
import os
import socket
import sys
from collections import deque

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
             queue: str | None = None) -> list[dict]:
        """Job records in ascending id order (the daemon's default limit is 100, at most 1000)."""
        fields = _given(state=state, target=target, limit=limit, after_id=after_id, queue=queue)
        return _field(self.call("list", **fields), "jobs", list, dict)

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

    def pause(self, queue: str | None = None) -> bool:
        """Start no new attempts (in `queue` alone, if given) until resume(); return the
        paused flag (True)."""
        return _field(self.call("pause", **_given(queue=queue)), "paused", bool)

    def resume(self, queue: str | None = None) -> bool:
        """Start attempts again (in `queue` alone, if given); return the paused flag (False)."""
        return _field(self.call("resume", **_given(queue=queue)), "paused", bool)

    def queues(self) -> list[dict]:
        """One object per queue: name, workers, running, paused, declared, isolation, counts."""
        return _field(self.call("queues"), "queues", list, dict)

    def set_workers(self, queue: str, workers: int) -> dict:
        """Give `queue` that many slots (until the daemon restarts or reloads); return the
        queue's object as queues() has it."""
        return _field(self.call("set_workers", queue=queue, workers=workers), "queue", dict)

    def prune(self, older_than: float | None = None) -> int:
        """Delete finished jobs older than `older_than` seconds (default: all); return how many."""
        return _field(self.call("prune", **_given(older_than=older_than)), "removed", int)


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


def job_table(jobs: list[dict], now: float | None = None) -> str:
    """An aligned table: ID STATE PRI ATTEMPTS TARGET WHEN."""
    if now is None:
        import time
        now = time.time()
    rows = [("ID", "STATE", "PRI", "ATTEMPTS", "TARGET", "WHEN")]
    for j in jobs:
        target = str(j.get("target", ""))
        if j.get("method") not in (None, "handle"):
            target += f" ({j['method']})"
        rows.append(tuple(escape(cell) for cell in (str(j.get("id")), str(j.get("state")),
                          str(j.get("priority", 0)), attempts_text(j), target, _when(j, now))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = (True, False, True, False, False, False)  # numbers line up on the right
    lines = []
    for r in rows:
        cells = [c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(r, widths, right)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


_JOB_FIELDS = ("id", "target", "method", "args", "kwargs", "priority", "state", "attempts",
               "retries", "retry_delay", "backoff", "timeout", "key", "queue", "after",
               "on_parent_failure", "created_at", "run_at",
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
            return report(JobrunnerError("bad_request", f"stdin line {n}: not JSON: {e}"))
        if not isinstance(job, dict):
            return report(JobrunnerError("bad_request", f"stdin line {n}: not a JSON object"))
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
            code = report(e, f"jobs {len(ids) + 1}-{len(ids) + len(chunk)} of {len(jobs)}")
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
    jobs = client.list(state=ns.state, target=ns.target, limit=ns.limit, queue=ns.queue)
    if ns.json:
        _out_json(jobs)
    elif jobs:
        _out(job_table(jobs))
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
            docs.append({"id": job_id, "error": {"code": e.code, "message": e.message}})
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
        return report(e)
    _out_docs(ns, docs)
    return worst(codes)


def _out_docs(ns, docs: list[dict]) -> None:
    """--json for commands over ids: a list for several ids, the reply for one
    (nothing on stdout if that one was refused: the error is on stderr)."""
    if not ns.json:
        return
    if len(ns.ids) > 1:
        _out_json(docs)
    elif "error" not in docs[0]:
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
        code = report(e)
        return worst(codes + [EXIT_TIMEOUT]) if deadline is not None else code
    except DaemonUnreachable as e:
        return report(e)
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
    return _paused(ns, client.pause(ns.queue))


def cmd_resume(client: Client, ns) -> int:
    return _paused(ns, client.resume(ns.queue))


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


COMMANDS = {"add": cmd_add, "list": cmd_list, "show": cmd_show, "cancel": cmd_cancel,
            "retry": cmd_retry, "wait": cmd_wait, "logs": cmd_logs, "stats": cmd_stats,
            "pause": cmd_pause, "resume": cmd_resume, "prune": cmd_prune,
            "queues": cmd_queues, "workers": cmd_workers, "update": cmd_update}


###############################################################################
# Argument parsing and main
###############################################################################

def _seconds(text: str) -> float:
    import argparse
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


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
            return argv[i] if argv[i] in COMMANDS else None
    return None


def build_parser(only: str | None = None):
    """The argparse parser, with every subcommand or `only` the one given. --socket and
    --json are accepted before and after the subcommand: the subparsers repeat them with
    SUPPRESS defaults so they do not overwrite a value given before."""
    import argparse

    class Parser(argparse.ArgumentParser):
        """Usage errors quote argv ("unrecognized arguments: ..."): escaped like all text."""

        def _print_message(self, message: str, file=None) -> None:
            super()._print_message(escape(message, keep_lines=True) if message else message, file)

    parser = Parser(
        prog="jobctl", description="Queue and inspect jobrunner jobs.",
        epilog="exit codes: 0 ok, 1 waited job failed/cancelled, 2 usage error or refused, "
               "3 daemon unreachable, 4 --timeout passed")
    parser.add_argument("--socket", metavar="PATH", help="daemon socket (default: $JOBRUNNER_SOCKET, "
                        "./storage/jobrunnerd.sock next to jobctl.py, /run/jobrunner/jobrunnerd.sock)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
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
    when.add_argument("--delay", type=_seconds, metavar="S", help="run no sooner than S seconds from now")
    when.add_argument("--at", type=_iso_time, metavar="ISO8601", dest="run_at",
                      help="run no sooner than this time (local time unless it has a zone)")
    p.add_argument("--retries", type=int, metavar="N", help="retries after a failed first attempt")
    p.add_argument("--retry-delay", type=_seconds, metavar="S", help="seconds before a retry")
    p.add_argument("--backoff", choices=("fixed", "exponential"))
    p.add_argument("--timeout", type=_timeout_or_none, default=_OMIT, metavar="S",
                   help="seconds an attempt may run, or 'none' for no limit")
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

    p = command("list", "list jobs")
    p.add_argument("--state", metavar="S", choices=STATES)
    p.add_argument("--target", metavar="PATTERN", help="fnmatch pattern")
    p.add_argument("--queue", metavar="Q", help="only the jobs of queue Q")
    p.add_argument("--limit", type=int, metavar="N", help="at most N jobs (daemon default 100, max 1000)")

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
    p.add_argument("--timeout", type=_seconds, metavar="S", help="give up after S seconds (exit 4)")
    p = command("logs", "print a job's output")
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.add_argument("--raw", action="store_true", help="write the output as it is, also to a terminal "
                   "(there control characters are otherwise shown escaped)")
    command("stats", "queue counts and daemon status")
    command("pause", "start no new attempts").add_argument(
        "--queue", metavar="Q", help="in queue Q alone (kept across restarts)")
    command("resume", "start attempts again").add_argument(
        "--queue", metavar="Q", help="in queue Q alone")
    command("queues", "each queue: workers used/total, paused, counts per state")
    p = command("workers", "set a queue's worker slots (until the daemon restarts or reloads)")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("workers", type=_count, metavar="N")
    p = command("prune", "delete finished jobs and their output")
    p.add_argument("--older-than", type=_seconds, metavar="S", help="only those finished S seconds ago")
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


def main(argv: list[str] | None = None) -> int:
    """Run one jobctl command; return its exit code."""
    try:
        ns = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_REFUSED
    try:
        with Client(ns.socket) as client:
            return COMMANDS[ns.command](client, ns)
    except JobrunnerError as e:
        return report(e)
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
