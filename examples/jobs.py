"""Example jobs: the PHP originals (ExampleJob, ErrorJob, DelayedJob) and small
targets the tests use to check arguments, exit codes, timeouts and the environment.

Queue them with `jobctl add examples.jobs:ExampleJob a b` or
`run_background_job("examples.jobs:ExampleJob", "handle", 1, 0, 3, "a", "b")`.
A class target is instantiated with no arguments and its method (default
`handle`) is called; a function target is called directly.
"""
import json
import os
import sys
import time


class ExampleJob:
    """Prints its parameters and returns them."""

    def handle(self, *params):
        print("ExampleJob: params", json.dumps(list(params)), flush=True)
        return {"params": list(params)}


class ErrorJob:
    """Always fails, to show retries and the error log."""

    def handle(self, *params):
        attempt = os.environ.get("JOBRUNNER_ATTEMPT", "?")
        print(f"ErrorJob: attempt {attempt}, about to fail", flush=True)
        raise RuntimeError(f"ErrorJob always fails (attempt {attempt})")


class DelayedJob:
    """Sleeps, to show delays, priorities and timeouts."""

    def handle(self, seconds=1.0):
        seconds = float(seconds)
        print(f"DelayedJob: sleeping {seconds}s", flush=True)
        time.sleep(seconds)
        print("DelayedJob: done", flush=True)
        return seconds


class Outer:
    """A dotted target: examples.jobs:Outer.Inner."""

    class Inner:
        def handle(self):
            return "inner"


def add(a, b):
    """a + b: a function target (no method)."""
    return a + b


def echo(*args, **kwargs):
    """Print and return the arguments exactly as received."""
    result = {"args": list(args), "kwargs": kwargs}
    print(json.dumps(result, sort_keys=True), flush=True)
    return result


def spawn_grandchild(seconds):
    """Start a grandchild that sleeps `seconds`, print its pid, sleep as long:
    a timeout or cancel must kill both (the whole process group)."""
    import subprocess      # here, not at the top: every other job here stays cheap to import
    seconds = float(seconds)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(%f)" % seconds])
    print(child.pid, flush=True)
    time.sleep(seconds)
    child.wait()
    return child.pid


def exit_with(code):
    """End the job process at once with exit status `code` (no exception, no cleanup)."""
    os._exit(int(code))


def env(name):
    """The job process's environment variable `name`, or None."""
    return os.environ.get(name)


def now():
    """The time this job's code started (for measuring enqueue -> start latency)."""
    return time.time()
