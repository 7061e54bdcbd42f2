#!/usr/bin/env python3
"""Where the CPU of a fresh-process job goes: no-op Python jobs with workers = 2 (start_method
"zygote", isolation "fresh"), and for each run the CPU per job of the daemon, of the zygote and
of the job processes (the zygote's reaped children), the minor page faults per job process, and
jobs/s; optionally against task-spooler running `/bin/true` with 2 slots in the same run.

    python3 bench/cpu_split.py                      # this checkout's daemon, 3 runs of 2000 jobs
    python3 bench/cpu_split.py --old /tmp/old.py    # alternated with another jobrunnerd.py
    python3 bench/cpu_split.py --tsp                # and tsp -S 2, /bin/true, in the same run
    python3 bench/cpu_split.py --strace daemon      # syscalls per job (strace -c) of the daemon,
                                                    # the zygote or the jobs (slow: counts only)

CPU is read from /proc: the daemon's and the zygote's own from /proc/PID/schedstat (ns), the job
processes' from the zygote's cutime + cstime (what it reaped, clock ticks summed over exact
run times), between the resume that opens the gate and the end of the last job.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run                                              # noqa: E402  (bench/run.py)

TICK = os.sysconf("SC_CLK_TCK")
STARTING = threading.Lock()
TSP_MAX = 900      # each queued tsp job is a client connection: tsp serves 1000 at most


def stat_fields(pid: int) -> list[bytes]:
    with open("/proc/%d/stat" % pid, "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def own_cpu(pid: int) -> float:
    """Seconds of CPU the process itself used (all its threads), ns resolution."""
    with open("/proc/%d/schedstat" % pid) as f:
        return int(f.read().split()[0]) / 1e9


def reaped(pid: int) -> tuple[float, int]:
    """(CPU seconds, minor faults) of the children `pid` has reaped."""
    fields = stat_fields(pid)
    return (int(fields[13]) + int(fields[14])) / TICK, int(fields[8])


def wakeups(pid: int) -> int:
    """Voluntary context switches: how often the process slept and was woken."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def zygote_of(daemon_pid: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open("/proc/%d/task/%d/children" % (daemon_pid, daemon_pid)) as f:
            for pid in f.read().split():
                with open("/proc/%s/cmdline" % pid, "rb") as g:
                    if b"jobrunner-zygote" in g.read():
                        return int(pid)
        time.sleep(0.01)
    raise RuntimeError("no zygote")


def sample(dpid: int, zpid: int) -> dict:
    child_cpu, child_faults = reaped(zpid)
    return {"daemon": own_cpu(dpid), "zygote": own_cpu(zpid), "jobs": child_cpu,
            "faults": child_faults, "zfaults": int(stat_fields(zpid)[7]),
            "dfaults": int(stat_fields(dpid)[7]), "dwakes": wakeups(dpid),
            "zwakes": wakeups(zpid), "t": time.perf_counter()}


def jobrunner_run(daemon_path: str, n: int, strace: str | None = None) -> dict:
    """One run: n no-op jobs queued behind a pause, then resumed; the split per job."""
    d = run.Daemon(workers=2)
    with STARTING:                      # run.Daemon starts the script named by run.DAEMON
        run.DAEMON = daemon_path
        d.start()
    try:
        dpid = d.proc.pid
        with run.Conn(d.socket) as c:
            c.call({"op": "wait", "id": c.call({"op": "add", "target": run.NOOP,
                                                "args": [0, 0]})["id"]})      # warm zygote
            c.call({"op": "pause"})
            jobs = [{"target": run.NOOP, "args": [i, 1]} for i in range(n)]
            last = None
            for i in range(0, n, 1000):
                last = c.call({"op": "add_batch", "jobs": jobs[i:i + 1000]})["ids"][-1]
            zpid = zygote_of(dpid)
            tracer = None
            if strace:
                target = {"daemon": ["-p", str(dpid)], "zygote": ["-p", str(zpid)],
                          "jobs": ["-f", "-p", str(zpid)]}[strace]
                out = os.path.join(d.root, "strace.txt")
                tracer = subprocess.Popen(["strace", "-c", "-o", out, *target],
                                          stderr=subprocess.DEVNULL)
                time.sleep(0.5)             # (a benchmark tool: strace attaches meanwhile)
            before = sample(dpid, zpid)
            c.call({"op": "resume"})
            c.call({"op": "wait", "id": last, "timeout": 600})
            while True:
                counts = c.call({"op": "stats"})["counts"]
                if counts["succeeded"] + counts["failed"] >= n + 1:
                    break
                time.sleep(0.002)
            after = sample(dpid, zpid)
            assert counts["failed"] == 0, counts
            result = {k: (after[k] - before[k]) / n for k in (
                "daemon", "zygote", "jobs", "faults", "zfaults", "dfaults", "dwakes", "zwakes")}
            result["rate"] = n / (after["t"] - before["t"])
            if tracer is not None:
                tracer.send_signal(2)
                tracer.wait()
                result["strace"] = strace_per_job(open(out).read(), n)
            return result
    finally:
        d.stop()


def strace_per_job(text: str, n: int) -> dict:
    calls = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            count = int(parts[3])
            calls[parts[-1]] = round(count / n, 2)
    calls["TOTAL"] = round(sum(calls.values()), 2)
    return dict(sorted(calls.items(), key=lambda kv: -kv[1]))


def tsp_run(n: int) -> dict:
    """n `/bin/true` through task-spooler with 2 slots, queued behind a gate job that takes
    both slots; from opening the gate to the end of the last."""
    root = tempfile.mkdtemp(prefix="jr-tsp-")
    env = dict(os.environ, TS_SOCKET=os.path.join(root, "ts.sock"), TMPDIR=root,
               TS_MAXFINISHED=str(n + 10), TS_MAXCONN=str(n + 10))
    fifo = os.path.join(root, "gate")
    os.mkfifo(fifo)
    tsp = lambda *a: subprocess.run(["tsp", *a], env=env, check=True, capture_output=True,
                                    text=True).stdout
    try:
        tsp("-S", "2")
        tsp("-N", "2", "sh", "-c", "read x < %s" % fifo)
        last = None
        for _ in range(n):
            last = tsp("/bin/true").strip()
        t0 = time.perf_counter()
        with open(fifo, "w") as f:
            f.write("go\n")
        tsp("-w", last)
        return {"rate": n / (time.perf_counter() - t0)}
    finally:
        subprocess.run(["tsp", "-K"], env=env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="jobs per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--old", help="another jobrunnerd.py, alternated with this one")
    parser.add_argument("--new", help="a jobrunnerd.py instead of this checkout's")
    parser.add_argument("--together", action="store_true",
                        help="run this daemon and --old at the same time (a noisy machine)")
    parser.add_argument("--tsp", action="store_true", help="also tsp -S 2 with /bin/true")
    parser.add_argument("--strace", choices=("daemon", "zygote", "jobs"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    run.byte_compile(os.path.join(run.ROOT, "examples", "jobs.py"))
    kinds = [("new", args.new or run.DAEMON)] + ([("old", args.old)] if args.old else [])
    results: dict[str, list] = {k: [] for k, _ in kinds}
    if args.tsp:
        results["tsp"] = []
    for _ in range(args.runs):
        if args.together and len(kinds) == 2:
            # Both daemons at once: whatever else loads the machine loads both alike.
            threads = [threading.Thread(target=lambda name=name, path=path: results[name].append(
                jobrunner_run(path, args.n, args.strace))) for name, path in kinds]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            continue
        for name, path in kinds:
            results[name].append(jobrunner_run(path, args.n, args.strace))
        if args.tsp:
            results["tsp"].append(tsp_run(min(args.n, TSP_MAX)))
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
        return 0
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "strace"}
           for name, rs in results.items()}
    for name, rs in results.items():
        m = med[name]
        line = "%-4s %6.0f jobs/s [%s]" % (name, m["rate"],
                                           " ".join("%.0f" % r["rate"] for r in rs))
        if "daemon" in m:
            line += ("   CPU/job ms: daemon %.3f  zygote %.3f  job %.3f  (sum %.3f)"
                     "   minor faults/job: daemon %.0f zygote %.0f job %.0f" % (
                        m["daemon"] * 1e3, m["zygote"] * 1e3, m["jobs"] * 1e3,
                        (m["daemon"] + m["zygote"] + m["jobs"]) * 1e3, m["dfaults"],
                        m["zfaults"], m["faults"]))
        if "daemon" in m:
            line += "   wake-ups/job: daemon %.2f zygote %.2f" % (m["dwakes"], m["zwakes"])
        print(line)
        if "strace" in rs[0]:
            print("     syscalls/job:", json.dumps(rs[-1]["strace"]))
    if "old" in med:
        # Each run of "new" against the "old" run next to it, then the median of those
        # ratios: the load of a shared machine drifts slower than a pair of runs.
        pairs = list(zip(results["new"], results["old"]))
        ratio = lambda k: statistics.median(a[k] / b[k] for a, b in pairs)
        print("new/old (median of %d same-run pairs): rate x%.2f  daemon x%.2f  zygote x%.2f"
              "  job x%.2f  sum x%.2f" % (len(pairs), ratio("rate"), ratio("daemon"),
                                         ratio("zygote"), ratio("jobs"), statistics.median(
                    (a["daemon"] + a["zygote"] + a["jobs"]) / (b["daemon"] + b["zygote"]
                                                              + b["jobs"]) for a, b in pairs)))
    if "tsp" in med:
        print("new/tsp: rate x%.2f" % (med["new"]["rate"] / med["tsp"]["rate"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
