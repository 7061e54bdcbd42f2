#!/usr/bin/env python3
"""jobrunner benchmarks: each figure is a median of several runs (with min-max) and a ratio to a
baseline measured in the same run, because absolute times drift on shared machines.

    python3 bench/run.py            # the standard sizes (a few minutes on 2 cores)
    python3 bench/run.py --quick    # tiny sizes: checks that everything works (the smoke test)
    python3 bench/run.py --big      # adds the 1,000,000-pending-job figures
    python3 bench/run.py --json     # one JSON document on stdout for scripts
    python3 bench/run.py --only enqueue,noop
    python3 bench/run.py --only pattern     # the loop's longest pause under a pattern query
    python3 bench/run.py --only peers       # against tsp and beanstalkd, same run

Figures (name: what / baseline):
  enqueue_pipelined   durable single adds pipelined on one connection / the same, fsync = "never"
  enqueue_batch       add_batch of 1000, durable / the same, fsync = "never"
  enqueue_clients_1   one client, one add at a time, durable / fsync = "never"
  enqueue_clients_16  16 clients, one add at a time each, durable / fsync = "never"
  noop_jobs           no-op Python jobs end to end, 2 workers, zygote / serially spawning
                      `sys.executable -I -S -c pass`
  start_latency       enqueue -> the job's code running, idle worker, zygote / spawn mode
  jobctl_add          wall time of `jobctl add` / `sys.executable -c "import socket, json"`
  pending_N           RSS per pending job (one sample); restart time / the same with 0 pending;
                      the enqueue rate with N pending / the same with 0 pending
  pattern_list_pause  the longest wait of a `stats` sent every 10 ms by one client while
                      another lists with a 1,024-character target pattern against N distinct
                      targets (paused daemon, the first list builds the target index) / the
                      same client's longest wait with no pattern query running
  pause_*_N           the loop's longest pause at N jobs (--big: 1,000,000): the slowest and the
                      p99 `stats` reply of a client asking every 10 ms while the journal is folded
                      into a snapshot (adds push it past the snapshot's size), while one job is
                      pruned and while N/10 are / the same client's with nothing else happening
  queues_10_*         with jobs spread over 10 queues of 1 worker each: no-op jobs/s
                      (queues_10_noop) and durable pipelined adds/s (queues_10_enqueue) / the
                      same with one queue of 10 workers and no `queue` field (today's clients)
  dispatch_N_10_queues  the Scheduler alone: time per start with N pending jobs (100,000;
                      --big 1,000,000) over 10 queues of 1 worker / the same with 1,000 pending
  deps_add_1000_parents  one durable `add` with `after` naming 1,000 live parents (paused
                      daemon) / the same `add` with no parents, alternated on the same daemon
  deps_unblock_10000  a `cancel` of a parent whose 10,000 blocked children have
                      on_parent_failure "run" (all unblocked in that one durable change) / the
                      `cancel` of a parent without children
  visibility_OP_N     reply time of `stats`, `queues`, `metrics` and `activity` (what `jobctl
                      top` asks each second) with N jobs (100,000; --big 1,000,000) over 10
                      queues, a tenth of them finished, median of 200 calls / `hello` on the
                      same connection, alternated (goal: under 5 ms at 1M)
  peers_*             against tsp and beanstalkd (bench/peers.py; `apt-get install task-spooler
                      beanstalkd`, else skipped), alternated in the same run, each with issue
                      #17's goal: no-op jobs/s, 2 workers, fresh (x0.5) and reuse (x2.0) / tsp
                      `/bin/true` with 2 slots; durable pipelined adds/s (x0.4) and add_batch
                      jobs/s (x1.0) / beanstalkd pipelined puts/s with its default fsync (every
                      50 ms: acks before fsync), and the same two / beanstalkd -f0 (fsync always)
  reuse_noop_jobs     no-op Python jobs end to end, 2 workers, isolation = "reuse" / the same
                      with "fresh", alternated
  reuse_slow_import_job  time per job of a job whose module sleeps 50 ms at import, 1 worker,
                      "reuse" (the import once per worker) / the same with "fresh" (per attempt)
  machine_*           what this machine charges for the steps the figures above are made of,
                      to compare machines by: one fdatasync; one copy-on-write page fault;
                      fork + exit of a Python process holding what the zygote holds / the same
                      without site-packages (`-S`)
Every daemon runs from this checkout, in a fresh temp directory, with `sys.executable`.
"""

import argparse
import mmap
import multiprocessing
import py_compile
import re
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # also when loaded by path
import peers    # noqa: E402  (bench/peers.py: tsp and beanstalkd, the same-run baselines)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMON = os.path.join(ROOT, "jobrunnerd.py")
JOBCTL = os.path.join(ROOT, "jobctl.py")
JOBCTL_COMMAND = os.path.join(ROOT, "jobctl")   # the `jobctl` launcher (cached bytecode)
NOOP = "examples.jobs:add"          # a function job: the cheapest real Python job


# -- a daemon and a client ---------------------------------------------------------------------

class Daemon:
    """jobrunnerd in a temp dir, started with sys.executable; stop() removes everything."""

    def __init__(self, **config):
        self.tmp = tempfile.TemporaryDirectory(prefix="jr-bench-")
        self.root = self.tmp.name
        self.socket = os.path.join(self.root, "s.sock")
        self.config = {"socket": self.socket, "state_dir": os.path.join(self.root, "state"),
                       "log_dir": os.path.join(self.root, "logs"), "job_paths": [ROOT],
                       "workers": 2, "kill_grace": 1, "shutdown_grace": 5}
        self.config.update(config)
        self.path = os.path.join(self.root, "c.toml")
        with open(self.path, "w") as f:
            for key, value in self.config.items():
                f.write("%s = %s\n" % (key, toml(value)))
        self.proc = None

    def start(self) -> float:
        """Start; return the seconds until the socket answers."""
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, DAEMON, "--config", self.path],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.root, "stderr"), "ab"))
        deadline = time.monotonic() + 600
        while True:
            try:
                with Conn(self.socket) as c:
                    c.call({"op": "hello"})
                return time.perf_counter() - t0
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("daemon did not start: " + open(
                        os.path.join(self.root, "stderr")).read()[-2000:])
                time.sleep(0.005)

    def rss(self) -> int:
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self, cleanup=True):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(600)
        if cleanup:
            self.tmp.cleanup()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def toml(value) -> str:
    """A config value: JSON's spelling, but tables (queues) inline as TOML has them."""
    if isinstance(value, dict):
        return "{%s}" % ", ".join("%s = %s" % (k, toml(v)) for k, v in value.items())
    return json.dumps(value)


class Conn:
    """One connection: JSON lines, pipelining with send_many/recv_many."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.lines: list[bytes] = []

    def send_raw(self, data: bytes):
        self.sock.sendall(data)

    def recv_lines(self, n: int) -> list[bytes]:
        """Exactly n reply lines (more that arrived stay buffered for the next call)."""
        while len(self.lines) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            parts = (self.buf + chunk).split(b"\n")
            self.buf = parts.pop()
            self.lines.extend(parts)
        lines, self.lines = self.lines[:n], self.lines[n:]
        return lines

    def call(self, req: dict) -> dict:
        self.send_raw((json.dumps(req) + "\n").encode())
        reply = json.loads(self.recv_lines(1)[0])
        if not reply.get("ok"):
            raise RuntimeError(reply)
        return reply

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def add_line(i: int) -> bytes:
    return b'{"op":"add","target":"%s","args":[%d,1]}\n' % (NOOP.encode(), i)


def pipelined_adds(path: str, n: int, window: int = 512, line=None) -> float:
    """n adds on one connection with up to `window` unanswered (each made by line(i),
    add_line by default); returns acks/s."""
    add_line = line or globals()["add_line"]
    with Conn(path) as c:
        t0 = time.perf_counter()
        sent = done = 0
        while done < n:
            k = min(window - (sent - done), n - sent)
            if k > 0:
                c.send_raw(b"".join(add_line(sent + i) for i in range(k)))
                sent += k
            got = c.recv_lines(min(window // 2, sent - done) or 1)
            done += len(got)
            assert all(b'"ok":true' in line for line in got), got[:1]
        return n / (time.perf_counter() - t0)


def batch_adds(path: str, n: int, size: int = 1000) -> float:
    job = {"target": NOOP, "args": [1, 1]}
    body = json.dumps({"op": "add_batch", "jobs": [job] * size}).encode() + b"\n"
    with Conn(path) as c:
        t0 = time.perf_counter()
        for _ in range(max(1, n // size)):
            c.send_raw(body)
            assert b'"ok":true' in c.recv_lines(1)[0]
        return max(1, n // size) * size / (time.perf_counter() - t0)


def client_adds(path: str, clients: int, per_client: int) -> float:
    """`clients` processes, each with one connection doing one add at a time (like separate
    programs; threads of one Python process would measure its GIL instead); total acks/s."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(clients + 1)
    procs = [ctx.Process(target=_one_client, args=(path, per_client, start))
             for _ in range(clients)]
    for p in procs:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError("a client failed: exit codes %r" % [p.exitcode for p in procs])
    return clients * per_client / elapsed


def _one_client(path: str, n: int, start) -> None:
    with Conn(path) as c:
        start.wait()
        for i in range(n):
            c.send_raw(add_line(i))
            assert b'"ok":true' in c.recv_lines(1)[0]


# -- figures -----------------------------------------------------------------------------------

def measure(fn, runs: int) -> dict:
    return summary([fn() for _ in range(runs)])


def summary(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": len(values)}


def measure_pair(fn, baseline, runs: int) -> tuple[dict, dict]:
    """Alternate the two (A B A B ...): drift on a shared machine hits both alike."""
    a, b = [], []
    for _ in range(runs):
        a.append(fn())
        b.append(baseline())
    return summary(a), summary(b)


def measure_round(fns: dict, runs: int) -> dict:
    """Each of fns (name -> function) once per round, in turn, `runs` rounds: as measure_pair,
    for a figure and several baselines (or figures sharing one). Each summary keeps its
    `values` in round order, for round_ratios."""
    values = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            values[name].append(fn())
    return {name: dict(summary(v), values=v) for name, v in values.items()}


def round_ratios(value: dict, baseline: dict) -> str:
    """The ratio of each round (a figure and its baseline measured back to back), median and
    min-max: steadier than the ratio of the medians when the machine's load swings."""
    ratios = [a / b for a, b in zip(value["values"], baseline["values"])]
    return "per round x%.2f [%.2f-%.2f]" % (statistics.median(ratios), min(ratios), max(ratios))


def figure(name, unit, value, baseline, baseline_name, higher_is_better=True, note="",
           goal=None):
    """goal: the ratio an issue asks for (rendered with whether this run meets it)."""
    ratio = value["median"] / baseline["median"] if baseline else None
    return {"name": name, "unit": unit, "value": value, "baseline": baseline,
            "baseline_name": baseline_name, "ratio": ratio,
            "higher_is_better": higher_is_better, "note": note, "goal": goal}


def skipped(name: str, reason: str) -> dict:
    """A figure this run could not measure (main() lists it apart, with the reason)."""
    return {"name": name, "skipped": reason}


def paused_daemon(fsync: str) -> Daemon:
    d = Daemon(fsync=fsync, max_queued=10_000_000)
    d.start()
    with Conn(d.socket) as c:
        c.call({"op": "pause"})
    return d


def bench_enqueue(sizes, runs):
    out = []
    cases = [
        ("enqueue_pipelined", lambda p: pipelined_adds(p, sizes["pipelined"])),
        ("enqueue_batch", lambda p: batch_adds(p, sizes["batch"])),
        ("enqueue_clients_1", lambda p: client_adds(p, 1, sizes["clients_1"])),
        ("enqueue_clients_16", lambda p: client_adds(p, 16, sizes["clients_16"])),
    ]
    for name, fn in cases:
        durable, unsafe = paused_daemon("always"), paused_daemon("never")   # queues grow alike
        try:
            value, base = measure_pair(lambda: fn(durable.socket), lambda: fn(unsafe.socket),
                                       runs)
        finally:
            durable.stop()
            unsafe.stop()
        out.append(figure(name, "jobs/s", value, base, 'fsync = "never"'))
    return out


def wait_all_done(path: str, n: int, timeout: float = 600):
    with Conn(path) as c:
        deadline = time.monotonic() + timeout
        while True:
            counts = c.call({"op": "stats"})["counts"]
            if counts["succeeded"] + counts["failed"] >= n:
                assert counts["failed"] == 0, counts
                return
            if time.monotonic() > deadline:
                raise RuntimeError("jobs did not finish: %r" % counts)
            time.sleep(0.01)


def noop_rate(n: int, start_method: str = "zygote", preload=(), target: str = NOOP,
              workers: int = 2, **config) -> float:
    """Jobs/s of n `target` jobs (args [i, 1]) queued while paused, from resume to the last
    end; with the zygote, one warm-up job first (the zygote, and under isolation = "reuse" a
    worker, are ready). `config`: more daemon keys (isolation, job_paths, allow)."""
    with Daemon(start_method=start_method, workers=workers, preload=list(preload),
                **config) as d:
        with Conn(d.socket) as c:
            c.call({"op": "hello"})
            if start_method == "zygote":        # the zygote warms up in the background
                c.call({"op": "wait", "id": c.call({"op": "add", "target": target,
                                                    "args": [0, 0]})["id"]})
            c.call({"op": "pause"})
            jobs = [{"target": target, "args": [i, 1]} for i in range(n)]
            for i in range(0, n, 1000):
                c.call({"op": "add_batch", "jobs": jobs[i:i + 1000]})
            t0 = time.perf_counter()
            c.call({"op": "resume"})
        wait_all_done(d.socket, n + (1 if start_method == "zygote" else 0))
        return n / (time.perf_counter() - t0)


def spawn_rate(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
    return n / (time.perf_counter() - t0)


def byte_compile(path: str) -> None:
    """Write PATH's cached bytecode, as an install (pip, `python3 -m compileall`) or a first
    import does. Where PYTHONDONTWRITEBYTECODE=1, Python would otherwise compile the file
    again in every process. A directory we may not write to just keeps the slower figure."""
    try:
        py_compile.compile(path, doraise=True)
    except OSError:
        pass


def bench_noop(sizes, runs):
    n = sizes["noop"]
    # Job code byte-compiled, as a deployment has it after its first import (see byte_compile).
    byte_compile(os.path.join(ROOT, *NOOP.partition(":")[0].split(".")) + ".py")
    value, base = measure_pair(lambda: noop_rate(n), lambda: spawn_rate(max(n // 4, 5)), runs)
    # `preload` imports the job module once in the zygote (documented: trades freshness of
    # job code for speed); a separate figure, against its own same-run baseline.
    module = NOOP.partition(":")[0]
    warm, base2 = measure_pair(lambda: noop_rate(n, preload=[module]),
                               lambda: spawn_rate(max(n // 4, 5)), runs)
    return [figure("noop_jobs", "jobs/s", value, base, "serial `python -I -S -c pass`"),
            figure("noop_jobs_preload", "jobs/s", warm, base2, "serial `python -I -S -c pass`",
                   note="preload = [%r]" % module)]


SLOW_IMPORT = 0.05          # s a module of the reuse figure sleeps at import: a heavy import


def bench_reuse(sizes, runs):
    """isolation = "reuse" (SPEC §2d) against "fresh", alternated in the same run: no-op jobs
    (2 workers), and per-job time of a job whose module sleeps SLOW_IMPORT at import (1 worker:
    fresh pays the import per attempt, reuse once per worker)."""
    n = sizes["reuse"]
    byte_compile(os.path.join(ROOT, *NOOP.partition(":")[0].split(".")) + ".py")
    value, base = measure_pair(lambda: noop_rate(n, isolation="reuse"),
                               lambda: noop_rate(n, isolation="fresh"), runs)
    out = [figure("reuse_noop_jobs", "jobs/s", value, base, 'isolation = "fresh"',
                  note="2 workers")]
    with tempfile.TemporaryDirectory(prefix="jr-bench-slow-") as jobs_dir:
        with open(os.path.join(jobs_dir, "jrbench_slow.py"), "w") as f:
            f.write("import time\ntime.sleep(%r)\n\ndef add(a, b):\n    return a + b\n"
                    % SLOW_IMPORT)
        byte_compile(os.path.join(jobs_dir, "jrbench_slow.py"))
        config = {"job_paths": [ROOT, jobs_dir], "allow": ["examples.*:*", "jrbench_slow:*"],
                  "target": "jrbench_slow:add", "workers": 1}
        m = sizes["reuse_import"]
        value, base = measure_pair(lambda: 1 / noop_rate(m, isolation="reuse", **config),
                                   lambda: 1 / noop_rate(m, isolation="fresh", **config), runs)
    out.append(figure("reuse_slow_import_job", "s", value, base, 'isolation = "fresh"',
                      higher_is_better=False,
                      note="per job, 1 worker, a %g ms import" % (SLOW_IMPORT * 1000)))
    return out


def start_latency(start_method: str, n: int) -> float:
    """Median seconds from sending `add` to the job's started_at, one job at a time."""
    with Daemon(start_method=start_method, workers=2) as d, Conn(d.socket) as c:
        c.call({"op": "wait", "id": c.call({"op": "add", "target": NOOP,
                                            "args": [0, 0]})["id"]})   # warm up
        gaps = []
        for i in range(n):             # examples.jobs:now returns when the job's code began
            t0 = time.time()
            job_id = c.call({"op": "add", "target": "examples.jobs:now"})["id"]
            job = c.call({"op": "wait", "id": job_id})["job"]
            gaps.append(job["result"] - t0)
        return statistics.median(gaps)


def bench_latency(sizes, runs):
    n = sizes["latency"]
    value, base = measure_pair(lambda: start_latency("zygote", n),
                               lambda: start_latency("spawn", n), runs)
    return [figure("start_latency", "s", value, base, "spawn mode", higher_is_better=False)]


def bench_jobctl(sizes, runs):
    n = sizes["jobctl"]
    byte_compile(JOBCTL)        # as installed: the `jobctl` command loads it, not compiles it
    with Daemon() as d:
        with Conn(d.socket) as c:
            c.call({"op": "pause"})
        env = dict(os.environ, JOBRUNNER_SOCKET=d.socket)

        def jobctl():
            t0 = time.perf_counter()
            for i in range(n):
                subprocess.run([sys.executable, JOBCTL_COMMAND, "add", NOOP, str(i), "1"], env=env,
                               check=True, stdout=subprocess.DEVNULL)
            return (time.perf_counter() - t0) / n

        def baseline():
            t0 = time.perf_counter()
            for _ in range(n):
                subprocess.run([sys.executable, "-c", "import socket, json"], check=True)
            return (time.perf_counter() - t0) / n

        value, base = measure_pair(jobctl, baseline, runs)
        return [figure("jobctl_add", "s", value, base, '`python -c "import socket, json"`',
                       higher_is_better=False)]


def bench_pending(n: int, sizes, runs):
    """RSS per pending job and restart time with n pending; enqueue rate at n vs at 0."""
    d, empty = paused_daemon("always"), paused_daemon("always")
    try:
        rss0 = d.rss()
        job = {"target": NOOP, "args": [1, 1]}
        with Conn(d.socket) as c:
            body = json.dumps({"op": "add_batch", "jobs": [job] * 1000}).encode() + b"\n"
            for _ in range(n // 1000):
                c.send_raw(body)
                c.recv_lines(1)
        rss1 = d.rss()
        full_rate, empty_rate = measure_pair(
            lambda: pipelined_adds(d.socket, sizes["pipelined"]),
            lambda: _reset(empty) and pipelined_adds(empty.socket, sizes["pipelined"]), runs)
        restart, restart_empty = measure_pair(lambda: _restart(d), lambda: _restart(empty), runs)
        rss2 = d.rss()
        with Conn(d.socket) as c:       # n, plus what the enqueue-rate runs added
            held = c.call({"op": "stats"})["counts"]["pending"]
    finally:
        d.stop()
        empty.stop()
    per_job = (rss1 - rss0) / n
    return [
        figure("rss_per_pending_job_%d" % n, "bytes", {"median": per_job, "min": per_job,
               "max": per_job, "runs": 1}, None, "", higher_is_better=False,
               note="after a restart: %.0f bytes/job" % ((rss2 - rss0) / held)),
        figure("restart_%d_pending" % n, "s", restart, restart_empty, "0 pending",
               higher_is_better=False),
        figure("enqueue_at_%d_pending" % n, "jobs/s", full_rate, empty_rate, "0 pending"),
    ]


def _reset(d: Daemon) -> bool:
    """Empty a paused daemon's queue again (cancel and prune), so it stays at ~0 pending."""
    with Conn(d.socket) as c:
        while True:
            jobs = c.call({"op": "list", "state": "pending", "limit": 1000})["jobs"]
            if not jobs:
                break
            c.send_raw(b"".join(b'{"op":"cancel","id":%d}\n' % j["id"] for j in jobs))
            c.recv_lines(len(jobs))
        c.call({"op": "prune"})
    return True


def _restart(d: Daemon) -> float:
    d.stop(cleanup=False)
    return d.start()


# -- the loop's longest pause -------------------------------------------------------------------

PROBE_INTERVAL = 0.01       # how often the probe asks for `stats`


def _probe(path: str, control) -> None:
    """A client that sends `stats` every PROBE_INTERVAL until `control` says stop, then sends
    back [(monotonic time sent, seconds to the reply)]. A stalled loop delays the reply; the
    next request goes out after it, so a stall shows as one long sample, not many."""
    samples = []
    with Conn(path) as c:
        control.send("ready")
        tick = time.monotonic()
        while not control.poll():
            t0 = time.monotonic()
            c.call({"op": "stats"})
            samples.append((t0, time.monotonic() - t0))
            tick = max(tick + PROBE_INTERVAL, time.monotonic())
            time.sleep(max(0.0, tick - time.monotonic()))
    control.send(samples)


def _record_line(job_id: int, **fields) -> str:
    rec = {"id": job_id, "target": NOOP, "args": [job_id, 1], "state": "pending",
           "retries": 0, "retry_delay": 1, "timeout": 3600, "created_at": 1.0e9}
    rec.update(fields)
    return json.dumps(rec, separators=(",", ":"))


def _write_state(state_dir: str, n: int, finished_at: list) -> None:
    """n jobs, the first len(finished_at) cancelled at those times, the rest pending: about half
    in queue.json (generation 1), the rest in the journal, which stays just below the size of
    the snapshot (so a few more adds make the daemon fold it). Our own layout: one job a line."""
    os.makedirs(state_dir, mode=0o750)
    in_snapshot = n * 51 // 100

    def line(i):
        if i <= len(finished_at):
            return _record_line(i, state="cancelled", finished_at=finished_at[i - 1])
        return _record_line(i)
    with open(os.path.join(state_dir, "queue.json"), "w") as f:
        f.write('{"format":1,"gen":1,"next_id":%d,"paused":true,"jobs":[\n' % (n + 1))
        f.write(",\n".join(line(i) for i in range(1, in_snapshot + 1)))
        f.write("\n]}\n")
    with open(os.path.join(state_dir, "journal.jsonl"), "w") as f:
        f.write('{"gen":1}\n')
        for start in range(in_snapshot + 1, n + 1, 1000):
            f.write('{"jobs":[%s]}\n' % ",\t".join(
                line(i) for i in range(start, min(start + 1000, n + 1))))


def _snapshot_gen(state_dir: str) -> int:
    with open(os.path.join(state_dir, "queue.json"), "rb") as f:
        return int(re.search(rb'"gen":(\d+)', f.readline(4096)).group(1))


def _settled(state_dir: str) -> bool:
    """No fold under way: no temp snapshot and no journal but journal.jsonl."""
    names = os.listdir(state_dir)
    return "queue.json.tmp" not in names and \
        not [x for x in names if x.startswith("journal") and x != "journal.jsonl"]


def _wait(condition, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.05)


def pauses(n: int) -> dict:
    """{phase: [reply seconds]} for the phases idle, compaction, prune_1, prune_tenth."""
    now = time.time()
    tenth = max(1, n // 10)
    d = Daemon(fsync="always", max_queued=10_000_000)
    _write_state(d.config["state_dir"], n, [now - 3000] + [now - 2000] * tenth)
    d.start()
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    probe = ctx.Process(target=_probe, args=(d.socket, theirs))
    windows = {}
    try:
        probe.start()
        ours.recv()
        state = d.config["state_dir"]
        with Conn(d.socket) as c:
            t0 = time.monotonic()
            time.sleep(3.0)
            windows["idle"] = (t0, time.monotonic())
            gen = _snapshot_gen(state)
            t0 = time.monotonic()
            job = {"target": NOOP, "args": [1, 1]}
            body = json.dumps({"op": "add_batch", "jobs": [job] * 1000}).encode() + b"\n"
            while _snapshot_gen(state) == gen:
                c.send_raw(body)
                c.recv_lines(1)
            _wait(lambda: _settled(state))
            time.sleep(0.5)
            windows["compaction"] = (t0, time.monotonic())
            for phase, older, expect in (("prune_1", 2500, 1), ("prune_tenth", 1500, tenth)):
                t0 = time.monotonic()
                removed = c.call({"op": "prune", "older_than": older})["removed"]
                if removed != expect:
                    raise RuntimeError("prune removed %d, not %d" % (removed, expect))
                time.sleep(0.5)
                _wait(lambda: _settled(state))
                time.sleep(0.5)
                windows[phase] = (t0, time.monotonic())
        ours.send("stop")
        samples = ours.recv()
        probe.join(60)
    finally:
        if probe.is_alive():
            probe.kill()
        d.stop()
    # A sample belongs to the phase its reply came in: one sent just before a prune may wait
    # for it, and the reply comes after the stall, inside the prune's window.
    return {phase: [s for t, s in samples if start <= t + s <= end]
            for phase, (start, end) in windows.items()}


def bench_pause(sizes, runs):
    out = []
    for n in sizes["pause"]:
        got = pauses(n)
        idle = got["idle"]
        for phase in ("compaction", "prune_1", "prune_tenth"):
            values = got[phase]
            for name, pick in (("max", max), ("p99", _p99)):
                value, base = pick(values), pick(idle)
                out.append(figure("pause_%s_%s_%d" % (name, phase, n), "s",
                                  {"median": value, "min": value, "max": value, "runs": 1},
                                  {"median": base, "min": base, "max": base, "runs": 1},
                                  "idle", higher_is_better=False,
                                  note="%d samples" % len(values)))
    return out


def _p99(values: list) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * 0.99))]


# -- what the machine charges --------------------------------------------------------------------

# The zygote's imports, then fork + _exit n times: CPU seconds (parent and child) per fork.
FORK_PROBE = """
import os, sys, gc, json, select, signal, socket, ctypes, fnmatch, importlib, resource, traceback
gc.freeze()
n = int(sys.argv[1])
def cpu():      # getrusage: microseconds (os.times() counts 10 ms ticks)
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
t = cpu()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print((cpu() - t) / n)
"""


def fork_cost(n: int, *flags: str) -> float:
    out = subprocess.run([sys.executable, *flags, "-c", FORK_PROBE, str(n)], check=True,
                         capture_output=True, text=True).stdout
    return float(out)


def fdatasync_cost(n: int) -> float:
    """Median seconds of a 100-byte append + fdatasync, where the daemons keep their state."""
    with tempfile.TemporaryDirectory(prefix="jr-bench-") as root:
        fd = os.open(os.path.join(root, "f"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                os.write(fd, b"x" * 99 + b"\n")
                os.fdatasync(fd)
                times.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
    return statistics.median(times)


def cow_fault_cost(pages: int) -> float:
    """Seconds per copy-on-write fault: a child writes once to each of `pages` pages its
    parent had written (minus the same loop again, once the pages are its own: the fastest of
    three, so that a preemption there cannot make the figure small or negative)."""
    area = mmap.mmap(-1, pages * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    offsets = range(0, pages * mmap.PAGESIZE, mmap.PAGESIZE)
    for i in offsets:
        area[i] = 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            t0 = time.perf_counter()
            for i in offsets:
                area[i] = 2
            faults = time.perf_counter() - t0
            loop = []
            for _ in range(3):
                t1 = time.perf_counter()
                for i in offsets:
                    area[i] = 3
                loop.append(time.perf_counter() - t1)
            os.write(w, repr((faults - min(loop)) / pages).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    if not data:
        raise RuntimeError("the copy-on-write probe's child died before it reported")
    return float(data)


def bench_machine(sizes, runs):
    n = sizes["machine"]
    sync = measure(lambda: fdatasync_cost(n), runs)
    fault = measure(lambda: cow_fault_cost(n * 50), runs)
    fork, bare = measure_pair(lambda: fork_cost(n * 3, "-I"), lambda: fork_cost(n * 3, "-I", "-S"),
                              runs)
    return [figure("machine_fdatasync", "s", sync, None, "", higher_is_better=False),
            figure("machine_cow_fault", "us", {k: v * 1e6 if k != "runs" else v
                                               for k, v in fault.items()}, None, "",
                   higher_is_better=False),
            figure("machine_fork_exit", "s", fork, bare, "the same with -S (no site-packages)",
                   higher_is_better=False, note="CPU, parent and child")]


def distinct_targets(path: str, n: int, size: int = 1000) -> None:
    """n jobs, each with a target of its own (examples.jobs:T000000, ...)."""
    with Conn(path) as c:
        for start in range(0, n, size):
            c.call({"op": "add_batch", "jobs": [{"target": "examples.jobs:T%06d" % i}
                                                for i in range(start, min(n, start + size))]})


def longest_stats_wait(path: str, during=None, settle: float = 0.1) -> float:
    """The longest reply time of a `stats` sent every 10 ms, from `settle` s before
    during() starts (in another thread) to `settle` s after it returns (or, without it,
    for 2 * settle s)."""
    done = threading.Event()
    worst = [0.0]

    def probe():
        with Conn(path) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                c.call({"op": "stats"})
                worst[0] = max(worst[0], time.perf_counter() - t0)
                time.sleep(0.01)
    thread = threading.Thread(target=probe)
    thread.start()
    time.sleep(settle)
    if during is not None:
        during()
    time.sleep(settle)
    done.set()
    thread.join()
    return worst[0]


def add_latencies(path: str, parents: list[int], n: int) -> float:
    """Median seconds of `n` durable adds (one at a time) whose `after` is `parents`."""
    times = []
    line = (json.dumps({"op": "add", "target": NOOP, "args": [1, 1], "after": parents})
            + "\n").encode()
    with Conn(path) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            c.send_raw(line)
            reply = c.recv_lines(1)[0]
            times.append(time.perf_counter() - t0)
            assert b'"ok":true' in reply, reply
    return statistics.median(times)


def cancel_time(path: str, children: int) -> float:
    """Seconds of the `cancel` of a new parent with `children` blocked children ("run":
    each one is unblocked by it), all in one durable change."""
    with Conn(path) as c:
        parent = c.call({"op": "add", "target": NOOP, "args": [1, 1]})["id"]
        child = {"target": NOOP, "args": [1, 1], "after": [parent], "delay": 3600,
                 "on_parent_failure": "run"}
        for i in range(0, children, 1000):
            c.call({"op": "add_batch", "jobs": [child] * min(1000, children - i)})
        blocked = c.call({"op": "stats"})["counts"]["blocked"]
        t0 = time.perf_counter()
        c.call({"op": "cancel", "id": parent})
        elapsed = time.perf_counter() - t0
        counts = c.call({"op": "stats"})["counts"]
        assert counts["blocked"] == blocked - children, counts
        return elapsed


def bench_deps(sizes, runs):
    out = []
    d = paused_daemon("always")
    try:
        with Conn(d.socket) as c:
            parents = c.call({"op": "add_batch", "jobs": [{"target": NOOP, "args": [1, 1]}]
                              * 1000})["ids"]
        n = sizes["deps_adds"]
        value, base = measure_pair(lambda: add_latencies(d.socket, parents, n),
                                   lambda: add_latencies(d.socket, [], n), runs)
        out.append(figure("deps_add_1000_parents", "s", value, base, "an add with no parents",
                          higher_is_better=False, note="median of %d adds a run" % n))
        children = sizes["deps_children"]
        value, base = measure_pair(lambda: cancel_time(d.socket, children),
                                   lambda: cancel_time(d.socket, 0), runs)
        out.append(figure("deps_unblock_%d" % children, "s", value, base,
                          "a parent without children", higher_is_better=False))
    finally:
        d.stop()
    return out


def bench_pattern(sizes, runs):
    n = sizes["pattern"]
    d = paused_daemon("never")
    counter = [0]

    def pattern_list():
        counter[0] += 1                 # a pattern of its own each run: no cache helps it
        pattern = ("*a" * 512)[:1024 - 8] + "%08d" % counter[0]
        with Conn(d.socket) as c:
            c.call({"op": "list", "target": pattern})
    try:
        distinct_targets(d.socket, n)
        value, base = measure_pair(lambda: longest_stats_wait(d.socket, pattern_list),
                                   lambda: longest_stats_wait(d.socket), runs)
    finally:
        d.stop()
    return [figure("pattern_list_pause", "s", value, base, "no pattern query",
                   higher_is_better=False, note="%d distinct targets" % n)]


QUEUES = ["q%d" % i for i in range(10)]


def queue_line(i: int) -> bytes:
    return b'{"op":"add","target":"%s","args":[%d,1],"queue":"q%d"}\n' % (NOOP.encode(), i, i % 10)


def queues_daemon(spread: bool, **config) -> Daemon:
    """10 queues of 1 worker (jobs go round them), or the default queue alone with 10."""
    if spread:
        return Daemon(workers=1, queues={q: {"workers": 1} for q in QUEUES}, **config)
    return Daemon(workers=10, **config)


def queues_noop_rate(n: int, spread: bool) -> float:
    with queues_daemon(spread) as d:
        with Conn(d.socket) as c:
            c.call({"op": "wait", "id": c.call({"op": "add", "target": NOOP,
                                                "args": [0, 0]})["id"]})   # zygote warm
            c.call({"op": "pause"})
            jobs = [dict({"target": NOOP, "args": [i, 1]}, **({"queue": "q%d" % (i % 10)}
                                                             if spread else {}))
                    for i in range(n)]
            for i in range(0, n, 1000):
                c.call({"op": "add_batch", "jobs": jobs[i:i + 1000]})
            t0 = time.perf_counter()
            c.call({"op": "resume"})
        wait_all_done(d.socket, n + 1)
        return n / (time.perf_counter() - t0)


def queues_enqueue_rate(n: int, spread: bool) -> float:
    d = queues_daemon(spread, max_queued=10_000_000)
    d.start()
    try:
        with Conn(d.socket) as c:
            c.call({"op": "pause"})
        return pipelined_adds(d.socket, n, line=queue_line if spread else add_line)
    finally:
        d.stop()


def bench_queues(sizes, runs):
    noop, base = measure_pair(lambda: queues_noop_rate(sizes["noop"], True),
                              lambda: queues_noop_rate(sizes["noop"], False), runs)
    adds, base2 = measure_pair(lambda: queues_enqueue_rate(sizes["pipelined"], True),
                               lambda: queues_enqueue_rate(sizes["pipelined"], False), runs)
    return [figure("queues_10_noop", "jobs/s", noop, base, "one queue of 10 workers",
                   note="10 queues x 1 worker"),
            figure("queues_10_enqueue", "jobs/s", adds, base2, "one queue, no queue field",
                   note="durable pipelined adds over 10 queues")]


def dispatch_cost(n: int, starts: int) -> float:
    """Microseconds per start of the Scheduler alone (in this process) with n pending jobs spread
    over 10 queues of 1 worker: each start takes a queue's slot (next_job pops its heap) and
    the attempt's end frees it, as the Dispatcher does."""
    sys.path.insert(0, ROOT)
    import jobrunnerd as jr
    with tempfile.TemporaryDirectory() as tmp:
        cfg = jr.Config({"workers": 1, "queues": {q: {"workers": 1} for q in QUEUES}}, tmp)
    s = jr.Scheduler(1)
    s.configure(cfg)
    now = 1_000_000.0
    s.jobs = {i: jr.Job(id=i, target=NOOP, state=jr.PENDING, priority=i % 7, run_at=now,
                        attempts=0, retries=0, queue=QUEUES[i % 10]) for i in range(1, n + 1)}
    for job in s.jobs.values():
        s.add(job, now, list.append)
    s.heapify()
    t0 = time.perf_counter()
    for _ in range(starts):
        job = s.next_job(now)
        queue = s.queue(job.queue)
        queue.running += 1              # the slot is taken ...
        queue.running -= 1              # ... and freed when the attempt ends
    return (time.perf_counter() - t0) / starts * 1e6


VISIBILITY_OPS = ("stats", "queues", "metrics", "activity")
VISIBILITY_CALLS = 200      # calls per op and run, alternated with `hello`


def visibility_daemon(n: int) -> Daemon:
    """A paused daemon loaded with n jobs over 10 queues (every tenth cancelled), written
    straight into queue.json as _write_state does."""
    queues = {"q%d" % i: {"workers": 1} for i in range(10)}
    d = Daemon(fsync="always", max_queued=10_000_000, queues=queues)
    state_dir = d.config["state_dir"]
    os.makedirs(state_dir, mode=0o750)
    with open(os.path.join(state_dir, "queue.json"), "w") as f:
        f.write('{"format":1,"gen":1,"next_id":%d,"paused":true,"jobs":[\n' % (n + 1))
        f.write(",\n".join(
            _record_line(i, queue="q%d" % (i % 10), **({"state": "cancelled", "finished_at":
                                                        time.time()} if i % 10 == 0 else {}))
            for i in range(1, n + 1)))
        f.write("\n]}\n")
    d.start()
    return d


def reply_times(path: str, op: str, calls: int) -> tuple[float, float]:
    """Median seconds of `op` and of `hello`, alternated on one connection."""
    a, b = [], []
    with Conn(path) as c:
        for _ in range(calls):
            t0 = time.perf_counter()
            c.call({"op": op})
            t1 = time.perf_counter()
            c.call({"op": "hello"})
            a.append(t1 - t0)
            b.append(time.perf_counter() - t1)
    return statistics.median(a), statistics.median(b)


def bench_visibility(sizes, runs):
    out = []
    for n in sizes["visibility"]:
        d = visibility_daemon(n)
        try:
            for op in VISIBILITY_OPS:
                got = [reply_times(d.socket, op, VISIBILITY_CALLS) for _ in range(runs)]
                value = summary([g[0] * 1e6 for g in got])
                base = summary([g[1] * 1e6 for g in got])
                out.append(figure("visibility_%s_%d" % (op, n), "us", value, base, "hello",
                                  higher_is_better=False,
                                  note="median of %d calls per run" % VISIBILITY_CALLS))
        finally:
            d.stop()
    return out


def bench_dispatch(sizes, runs):
    n, starts = sizes["dispatch"], sizes["dispatch_starts"]
    value, base = measure_pair(lambda: dispatch_cost(n, starts),
                               lambda: dispatch_cost(1000, starts), runs)
    return [figure("dispatch_%d_10_queues" % n, "us", value, base, "1,000 pending",
                   higher_is_better=False,
                   note="per start, %d starts; O(log n): a heap pop" % starts)]


# -- against the peers: tsp and beanstalkd (issue #17) ------------------------------------------

PEER_GOALS = {"noop_fresh": 0.5, "noop_fresh_preload": 0.5,  # issue #17: x tsp /bin/true,
              "noop_reuse": 2.0,                                # 2 slots
              "add_pipelined": 0.4, "add_batch": 1.0}   # x beanstalkd pipelined put, fsync 50 ms


def reuse_built() -> bool:
    """Whether this checkout's daemon accepts `isolation = "reuse"` (issue #17, item 1)."""
    with tempfile.TemporaryDirectory(prefix="jr-bench-") as tmp:
        path = os.path.join(tmp, "c.toml")
        with open(path, "w") as f:
            f.write('isolation = "reuse"\n')
        return subprocess.run([sys.executable, DAEMON, "--check-config", "--config", path],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def fresh_daemon_rate(fn, n: int) -> float:
    """fn(socket, n) against a new paused durable daemon, as each peer run gets a new server."""
    d = paused_daemon("always")
    try:
        return fn(d.socket, n)
    finally:
        d.stop()


def bench_peers(sizes, runs):
    out = []
    n = sizes["peers_noop"]
    no_tsp, reuse = peers.missing("tsp"), reuse_built()
    if no_tsp:
        out += [skipped(name, no_tsp) for name in ("peers_noop_fresh",
                                                   "peers_noop_fresh_preload",
                                                   "peers_noop_fresh_tsp_python")]
    else:
        module = NOOP.partition(":")[0]
        python = (sys.executable, "-I", "-S", "-c", "pass")     # a Python process, no more
        fns = {"fresh": lambda: noop_rate(n), "tsp": lambda: peers.tsp_rate(n, slots=2),
               "fresh_preload": lambda: noop_rate(n, preload=[module]),
               "tsp_python": lambda: peers.tsp_rate(n, slots=2, command=python)}
        if reuse:
            fns["reuse"] = lambda: noop_rate(n, isolation="reuse")
        how = {"fresh": "isolation = 'fresh'", "reuse": "isolation = 'reuse'",
               # still fresh (SPEC section 2): each attempt a fork of an interpreter that
               # imported only what the operator lists to preload
               "fresh_preload": "isolation = 'fresh', preload = [%r]" % module}
        got = measure_round(fns, runs)
        out += [figure("peers_noop_" + mode, "jobs/s", got[mode], got["tsp"],
                       "tsp /bin/true, 2 slots", goal=PEER_GOALS["noop_" + mode],
                       note="no-op Python jobs, workers = 2, %s; %s"
                       % (how[mode], round_ratios(got[mode], got["tsp"])))
                for mode in fns if not mode.startswith("tsp")]
        # The same kind of work on both sides: a new Python process per job.
        out.append(figure("peers_noop_fresh_tsp_python", "jobs/s", got["fresh"],
                          got["tsp_python"], "tsp `python3 -I -S -c pass`, 2 slots",
                          note="no-op Python jobs, workers = 2, isolation = 'fresh'; %s"
                          % round_ratios(got["fresh"], got["tsp_python"])))
    if no_tsp or not reuse:
        out.append(skipped("peers_noop_reuse", no_tsp or 'not built: this daemon refuses'
                                                         ' isolation = "reuse"'))
    n = sizes["peers_puts"]
    no_beanstalkd = peers.missing("beanstalkd")
    if no_beanstalkd:
        return out + [skipped("peers_" + name, no_beanstalkd)
                      for name in ("add_pipelined", "add_pipelined_f0", "add_batch",
                                   "add_batch_f0")]
    got = measure_round({
        "add": lambda: fresh_daemon_rate(pipelined_adds, n),
        "put_50ms": lambda: peers.beanstalkd_put_rate(n, fsync="50ms"),
        "batch": lambda: fresh_daemon_rate(batch_adds, sizes["batch"]),
        "put_always": lambda: peers.beanstalkd_put_rate(sizes["peers_puts_f0"],
                                                        fsync="always")}, runs)
    for name, key, what in (("add_pipelined", "add", "durable adds pipelined, window 512"),
                            ("add_batch", "batch", "durable add_batch of 1000")):
        out.append(figure("peers_" + name, "jobs/s", got[key], got["put_50ms"],
                          "beanstalkd put, fsync every 50 ms", goal=PEER_GOALS[name],
                          note="%s; %s; the issue's baseline: beanstalkd acks before fsync"
                          % (what, round_ratios(got[key], got["put_50ms"]))))
        out.append(figure("peers_%s_f0" % name, "jobs/s", got[key], got["put_always"],
                          "beanstalkd put, -f0", note="%s; %s; beanstalkd fsyncs every put"
                          % (what, round_ratios(got[key], got["put_always"]))))
    return out


SIZES = {
    "standard": {"pipelined": 20000, "batch": 100000, "clients_1": 2000, "clients_16": 1000,
                 "noop": 1000, "latency": 30, "jobctl": 20, "pending": [100_000], "machine": 100,
                 "pattern": 200_000, "pause": [100_000], "deps_adds": 200,
                 "deps_children": 10_000, "dispatch": 100_000, "dispatch_starts": 900,
                 "visibility": [100_000], "peers_noop": 1000, "peers_puts": 20000,
                 "peers_puts_f0": 2000,       # -f0: an fsync a put, ~1-5k puts/s
                 "reuse": 2000, "reuse_import": 20},
    "quick": {"pipelined": 300, "batch": 2000, "clients_1": 50, "clients_16": 10,
              "noop": 20, "latency": 3, "jobctl": 2, "pending": [5000], "machine": 20,
              "pattern": 2000, "pause": [5000], "deps_adds": 5, "deps_children": 100,
              "dispatch": 5000, "dispatch_starts": 900, "visibility": [5000],
              "peers_noop": 20, "peers_puts": 300, "peers_puts_f0": 100, "reuse": 20,
              "reuse_import": 3},
}
GROUPS = ("machine", "enqueue", "noop", "queues", "dispatch", "latency", "jobctl", "pending",
          "pattern", "pause", "deps", "visibility", "reuse", "peers")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run each")
    parser.add_argument("--big", action="store_true", help="also 1,000,000 pending jobs")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3, --quick 1)")
    parser.add_argument("--only", help="comma-separated groups: " + ",".join(GROUPS))
    args = parser.parse_args(argv)
    sizes = dict(SIZES["quick" if args.quick else "standard"])
    if args.big:
        sizes["pending"] = sizes["pending"] + [1_000_000]
        sizes["pause"] = sizes["pause"] + [1_000_000]
        sizes["dispatch"] = 1_000_000
        sizes["visibility"] = [1_000_000]
    runs = args.runs or (1 if args.quick else 3)
    groups = args.only.split(",") if args.only else GROUPS
    figures = []
    for group in groups:
        if group == "pending":
            for n in sizes["pending"]:
                figures += bench_pending(n, sizes, runs)
        else:
            figures += globals()["bench_" + group](sizes, runs)
    doc = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "runs": runs,
           "quick": args.quick, "sizes": sizes, "figures": [f for f in figures if "skipped" not in f],
           "skipped": [f for f in figures if "skipped" in f]}
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        print(render(doc))
    return 0


def render(doc) -> str:
    lines = ["jobrunner benchmarks (python %s, %d cpus, median of %d, [min-max])"
             % (doc["python"], doc["cpus"], doc["runs"]), ""]
    for f in doc["figures"]:
        v = f["value"]
        text = "%-28s %s %s" % (f["name"], fmt(v["median"], f["unit"]),
                                "[%s-%s]" % (fmt(v["min"], f["unit"], False),
                                             fmt(v["max"], f["unit"], False)))
        if f["baseline"]:
            text += "   vs %s %s: x%.2f" % (f["baseline_name"],
                                           fmt(f["baseline"]["median"], f["unit"]), f["ratio"])
        if f.get("goal"):
            met = f["ratio"] >= f["goal"] if f["higher_is_better"] else f["ratio"] <= f["goal"]
            text += "   goal x%.2f: %s" % (f["goal"], "not judged at --quick sizes"
                                             if doc.get("quick") else "met" if met else "NOT met")
        if f["note"]:
            text += "   (%s)" % f["note"]
        lines.append(text)
    for f in doc.get("skipped", ()):
        lines.append("%-28s skipped: %s" % (f["name"], f["skipped"]))
    return "\n".join(lines)


def fmt(value, unit, with_unit=True) -> str:
    if unit == "s":
        text = "%.2f ms" % (value * 1000) if value < 1 else "%.2f s" % value
        return text if with_unit else text.split()[0]
    if unit == "us":
        return "%.2f%s" % (value, " us" if with_unit else "")
    if unit == "jobs/s":
        return "%.0f%s" % (value, " jobs/s" if with_unit else "")
    return "%.0f%s" % (value, " " + unit if with_unit else "")


if __name__ == "__main__":
    sys.exit(main())
