"""The peers jobrunner's figures are measured against, each run privately in a temp dir:
task-spooler (`tsp`, Debian's name for `ts`) and beanstalkd. Standard library only.

    tsp_rate(n, slots=2)                  /bin/true jobs/s through a private tsp server
    beanstalkd_put_rate(n, window, fsync) pipelined `put`s/s to a private beanstalkd with a binlog

A peer that is not installed raises NotInstalled, whose message names the install command
(INSTALL); `missing(peer)` says so beforehand. Nothing here touches a tsp server or beanstalkd of
the user's: every server gets its own socket or port, its own files, and is killed after.

    python3 bench/peers.py                 # both peers at the standard sizes, one run each
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

INSTALL = "apt-get install task-spooler beanstalkd"     # Debian and Ubuntu package names
PEERS = {"tsp": "tsp", "beanstalkd": "beanstalkd"}       # peer -> the program it runs
TIMEOUT = 600.0         # seconds any one step may take before the run is called broken
# A queued tsp job's client stays connected to the server, which holds at most 1,000 clients
# (MAXCONN, fixed at build time; a client past it waits forever): queue at most this many at once.
TSP_ROUND = 500

# beanstalkd's fsync modes with a binlog (-b): its default fsyncs at most every 50 ms, so a
# `put` is acknowledged before its fsync (the 159k/s baseline, most likely); -f0
# fsyncs before every acknowledgement, as jobrunner's fsync = "always" does (per loop pass).
BEANSTALKD_FSYNC = {"50ms": [], "always": ["-f0"]}

# The body of each `put`: what jobrunner's bench `add` carries, so both store the same bytes.
PUT_BODY = b'{"target":"examples.jobs:add","args":[%d,1]}'


class NotInstalled(RuntimeError):
    """A peer's program is not on PATH; the message says how to install it."""


def missing(peer: str) -> str | None:
    """Why `peer` ("tsp" or "beanstalkd") cannot run here, or None when it can."""
    if shutil.which(PEERS[peer]) is None:
        return "%s is not installed (%s)" % (PEERS[peer], INSTALL)
    return None


def require(peer: str) -> None:
    reason = missing(peer)
    if reason:
        raise NotInstalled(reason)


# -- task-spooler ------------------------------------------------------------------------------

def tsp_rate(n: int, slots: int = 2, command: tuple = ("/bin/true",)) -> float:
    """Jobs/s of n `command` jobs (default `/bin/true`) through a private tsp server with
    `slots` slots: the jobs
    are queued behind `slots` gate jobs (each holds a slot until its FIFO is written), and the
    clock runs from opening the gates to the end of the last jobs (`tsp -w`), in rounds of at
    most TSP_ROUND jobs. tsp keeps each job's output in a file (its default), as jobrunner
    keeps each job's log."""
    require("tsp")
    with tempfile.TemporaryDirectory(prefix="jr-bench-tsp-") as tmp:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TS_")}     # no mail, on-finish hook or saved list of the user's
        env.update(TS_SOCKET=os.path.join(tmp, "tsp.sock"), TMPDIR=tmp, TS_SLOTS=str(slots),
                   TS_MAXFINISHED=str(n + slots + 10))  # keep every finished job listed
        gates = [os.path.join(tmp, "gate%d" % i) for i in range(slots)]
        elapsed = 0.0
        try:
            _tsp(env, "-S", str(slots))     # starts the private server
            for gate in gates:
                os.mkfifo(gate)
            for start in range(0, n, TSP_ROUND):
                elapsed += _tsp_round(env, gates, min(TSP_ROUND, n - start), command)
        finally:
            _tsp(env, "-K", check=False)
            for gate in gates:              # a gate job still waiting: let it end
                try:
                    os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
        return n / elapsed


def _tsp_round(env: dict, gates: list, n: int, command: tuple) -> float:
    """Seconds from opening the gates to the end of n queued `command` jobs."""
    for gate in gates:
        _tsp(env, "sh", "-c", 'read line < "$0"', gate)
    # One shell loop queues the jobs: a process per job is tsp's interface.
    queued = subprocess.run(
        ["sh", "-c", 'n=$1; shift; i=0; while [ $i -lt "$n" ]; do tsp "$@" || exit 1; '
                     'i=$((i + 1)); done', "sh", str(n), *command],
        env=env, check=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, text=True)
    ids = queued.stdout.split()
    if len(ids) != n:
        raise RuntimeError("tsp queued %d jobs of %d: %r" % (len(ids), n, ids[-3:]))
    writers = [_open_gate(gate) for gate in gates]       # each gate job is running now
    waiters = [subprocess.Popen(["tsp", "-w", job_id], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL)
               for job_id in ids[-len(gates):]]          # the last to end are among these
    t0 = time.perf_counter()
    for fd in writers:
        os.write(fd, b"go\n")
        os.close(fd)
    codes = [waiter.wait(TIMEOUT) for waiter in waiters]
    elapsed = time.perf_counter() - t0
    if any(codes):
        raise RuntimeError("tsp -w said the last jobs failed: %r" % codes)
    return elapsed


def _tsp(env: dict, *args: str, check: bool = True) -> None:
    subprocess.run(("tsp",) + args, env=env, check=check, timeout=TIMEOUT,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=None if check else subprocess.DEVNULL)


def _open_gate(path: str) -> int:
    """The write end of a gate's FIFO, once its gate job has it open to read (before then a
    non-blocking open fails with ENXIO): the gate job holds its slot from then on."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != 6 or time.monotonic() > deadline:     # 6: ENXIO, no reader yet
                raise
            time.sleep(0.002)


# -- beanstalkd --------------------------------------------------------------------------------

def beanstalkd_put_rate(n: int, window: int = 512, fsync: str = "50ms") -> float:
    """Puts/s of n `put`s pipelined on one connection (at most `window` unanswered, as
    bench/run.py's pipelined_adds) to a private beanstalkd on 127.0.0.1 with a binlog in a
    temp dir; `fsync` is a key of BEANSTALKD_FSYNC."""
    require("beanstalkd")
    with tempfile.TemporaryDirectory(prefix="jr-bench-beanstalkd-") as tmp:
        proc, port = _start_beanstalkd(tmp, BEANSTALKD_FSYNC[fsync])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return _pipelined_puts(sock, n, window)
        finally:
            proc.kill()
            proc.wait(TIMEOUT)


def _start_beanstalkd(tmp: str, flags: list) -> tuple[subprocess.Popen, int]:
    """beanstalkd with its binlog in tmp, on a port that was free a moment ago (tried again
    should another program take it first); returns once it accepts connections."""
    binlog = os.path.join(tmp, "binlog")
    os.mkdir(binlog)
    for _ in range(5):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen(["beanstalkd", "-l", "127.0.0.1", "-p", str(port), "-b", binlog]
                                + flags, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc, port
            except OSError:
                time.sleep(0.005)
        proc.kill()
        error = proc.communicate()[1].decode(errors="replace")
    raise RuntimeError("beanstalkd did not start: " + error[-2000:])


def _pipelined_puts(sock: socket.socket, n: int, window: int) -> float:
    """The puts are built and the replies checked outside the clock's hot path, so that the
    figure is beanstalkd's and not this Python client's (which otherwise takes most of a core)."""
    puts = [b"put 0 0 60 %d\r\n%s\r\n" % (len(body), body)
            for body in (PUT_BODY % i for i in range(n))]
    replies = []
    t0 = time.perf_counter()
    sent = done = 0
    while done < n:
        k = min(window - (sent - done), n - sent)
        if k > 0:
            sock.sendall(b"".join(puts[sent:sent + k]))
            sent += k
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("beanstalkd closed the connection")
        replies.append(chunk)
        done += chunk.count(b"\n")
    elapsed = time.perf_counter() - t0
    lines = b"".join(replies).split(b"\r\n")
    if lines.pop() or len(lines) != n or any(not line.startswith(b"INSERTED ") for line in lines):
        raise RuntimeError("beanstalkd refused a put: %r"
                           % next((line for line in lines if not line.startswith(b"INSERTED ")),
                                  "%d replies to %d puts" % (len(lines), n)))
    return n / elapsed


def main() -> int:
    def tsp() -> str:
        return "%.0f jobs/s (/bin/true, 2 slots)" % tsp_rate(1000)

    def beanstalkd() -> str:
        return "%.0f puts/s (fsync every 50 ms), %.0f puts/s (-f0)" % (
            beanstalkd_put_rate(100_000), beanstalkd_put_rate(2_000, fsync="always"))

    for peer, run in (("tsp", tsp), ("beanstalkd", beanstalkd)):
        reason = missing(peer)
        print("%-10s %s" % (peer, "skipped: " + reason if reason else run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
