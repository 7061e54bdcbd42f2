"""The suite on every core: `python3 -m unittest` runs the test modules in worker processes.

Discovery of the `tests` package calls its `load_tests()` (tests/__init__.py), which returns a
ParallelSuite: the modules discovery found, handed one at a time to JOBS worker processes
(`python -m tests.parallel --worker`), the slowest first. Each worker runs a module as
`python3 -m unittest tests.test_x` would and reports every test's outcome on a pipe as a JSON
line; the suite replays those outcomes into the runner's own result, so the dots, the failure
tracebacks, "Ran N tests" and the exit status are unittest's as usual.

Why: most of the suite's time is spent waiting (on daemons, job processes, timeouts), not
computing: a serial run uses about a third of one core. Two workers on two cores halve the
wall time, so the suite stays within its 5-minute budget as it grows.

JOBRUNNER_TEST_JOBS=1 runs serially, in one process, exactly as plain unittest would; so does a
run filtered with -k (a worker loads whole modules). Naming modules (`python3 -m unittest
tests.test_cli`) never comes here.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import unittest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seconds each module took in a serial run on an idle 2-core machine (rounded): only the order
# in which modules are handed out (longest first, so no long module starts last). A module not
# listed counts as DEFAULT_WEIGHT. Stale figures cost a little balance, never a result.
WEIGHTS = {
    "test_attack_zygote": 31, "test_attack_contain": 17, "test_e2e_protocol": 18,
    "test_attack_conns": 17, "test_systemd": 17, "test_cli": 16, "test_bench_smoke": 15,
    "test_e2e_lifecycle": 15, "test_attack_jobctl": 14, "test_durability": 13,
    "test_deps": 13, "test_hardening": 12, "test_schedules": 11, "test_cli_everyday": 9,
    "test_queues": 7, "test_start_methods": 7, "test_metrics_top": 6, "test_attack_logs": 5,
}
DEFAULT_WEIGHT = 8


def jobs() -> int:
    """How many workers: JOBRUNNER_TEST_JOBS, else one per core, at most 2 (the timing bounds
    of some tests assume a core each; more workers would mostly wait for each other)."""
    text = os.environ.get("JOBRUNNER_TEST_JOBS", "")
    if text.strip():
        return max(1, int(text))
    return max(1, min(2, os.cpu_count() or 1))


def load(loader: unittest.TestLoader, pattern: str | None) -> unittest.TestSuite:
    """What tests/__init__.py's load_tests() returns: the discovered suite, in parallel when
    that can be done."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = loader.discover(start_dir=here, pattern=pattern or "test*.py", top_level_dir=TOP)
    if jobs() < 2 or loader.testNamePatterns or os.environ.get("JOBRUNNER_TEST_WORKER"):
        return found
    modules, local = [], unittest.TestSuite()
    for module_suite in found:
        names = {type(t).__module__ for t in _tests(module_suite)}
        if len(names) == 1 and names <= set(sys.modules) and not _failed_import(module_suite):
            modules.append(names.pop())
        else:
            local.addTest(module_suite)         # an import failure: reported here, as usual
    return ParallelSuite(modules, local)


def _tests(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _tests(item)
        else:
            yield item


def _failed_import(suite) -> bool:
    return any(type(t).__module__ == "unittest.loader" for t in _tests(suite))


####################################################################################################
#  The parent: hands out modules, replays outcomes
####################################################################################################

class RemoteFailure(Exception):
    """A failure or error in a worker: its message is the worker's formatted traceback."""


class RemoteTest:
    """Stands for a test that ran in a worker, in the parent's result."""

    failureException = AssertionError

    def __init__(self, test_id: str, description: str):
        self._id, self._description = test_id, description

    def id(self) -> str:
        return self._id

    def __str__(self) -> str:
        return self._description

    def shortDescription(self):
        return None


class Worker:
    def __init__(self):
        read_end, write_end = os.pipe()
        env = dict(os.environ, JOBRUNNER_TEST_WORKER="1", JOBRUNNER_TEST_RESULTS=str(write_end))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.parallel", "--worker"],
                                     cwd=TOP, stdin=subprocess.PIPE, env=env,
                                     pass_fds=(write_end,))
        os.close(write_end)
        self.results = os.fdopen(read_end, "rb", buffering=0)
        self.pending = b""
        self.module: str | None = None
        self.tests: dict[str, RemoteTest] = {}
        self.last_test: str | None = None

    def read_lines(self) -> list[bytes] | None:
        """The whole lines one read brings (the pipe is read unbuffered, so that select()
        sees what is left); None at the end of the pipe."""
        data = os.read(self.results.fileno(), 1 << 16)
        if not data:
            return None
        *lines, self.pending = (self.pending + data).split(b"\n")
        return lines

    def give(self, module: str | None) -> None:
        self.module = module
        try:
            if module is None:
                self.proc.stdin.close()
            else:
                self.proc.stdin.write(module.encode() + b"\n")
                self.proc.stdin.flush()
        except BrokenPipeError:
            pass                                # it died: its results pipe says so next

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.results.close()


class ParallelSuite(unittest.TestSuite):
    def __init__(self, modules: list[str], local: unittest.TestSuite):
        super().__init__()
        short = lambda m: m.rsplit(".", 1)[-1]
        self.modules = sorted(modules, key=lambda m: -WEIGHTS.get(short(m), DEFAULT_WEIGHT))
        self.local = local

    def countTestCases(self) -> int:
        return 0

    def run(self, result, debug=False):
        self.local.run(result)
        todo = list(self.modules)
        workers = []
        with selectors.DefaultSelector() as sel:
            try:
                for _ in range(min(jobs(), len(todo))):
                    self._start(sel, workers, todo)
                while workers:
                    for key, _ in sel.select():
                        worker = key.data
                        lines = worker.read_lines()
                        for line in lines or ():
                            event = json.loads(line)
                            if "done" in event:         # its module is over: the next one
                                stop = result.shouldStop or not todo
                                worker.give(None if stop else todo.pop(0))
                            else:
                                self._replay(worker, event, result)
                        if lines is not None:
                            continue
                        sel.unregister(worker.results)
                        workers.remove(worker)
                        code = worker.proc.wait()
                        if worker.module is not None:
                            self._lost(worker, code, result)
                            if todo and not result.shouldStop:
                                self._start(sel, workers, todo)
                        worker.stop()
            finally:
                for worker in workers:
                    worker.stop()
        return result

    def _start(self, sel, workers, todo) -> None:
        worker = Worker()
        workers.append(worker)
        sel.register(worker.results, selectors.EVENT_READ, worker)
        worker.give(todo.pop(0))

    def _replay(self, worker: Worker, event: dict, result) -> None:
        test = worker.tests.get(event["id"])
        if test is None:
            test = worker.tests[event["id"]] = RemoteTest(event["id"], event["description"])
        kind = event["kind"]
        if kind == "start":
            worker.last_test = event["id"]
            result.startTest(test)
        elif kind == "stop":
            result.stopTest(test)
            del worker.tests[event["id"]]
        elif kind == "success":
            result.addSuccess(test)
        elif kind in ("failure", "error"):
            err = (RemoteFailure, RemoteFailure(event["text"]), None)
            (result.addFailure if kind == "failure" else result.addError)(test, err)
        elif kind == "skip":
            result.addSkip(test, event["reason"])
        elif kind == "expected_failure":
            result.addExpectedFailure(test, (RemoteFailure, RemoteFailure(event["text"]), None))
        elif kind == "unexpected_success":
            result.addUnexpectedSuccess(test)

    def _lost(self, worker: Worker, code: int, result) -> None:
        """A worker that died in a module (a crash of the test process itself): an error."""
        test = RemoteTest(worker.module, "%s (worker)" % worker.module)
        text = ("the worker process running %s exited with status %s; the last test it started "
                "was %s" % (worker.module, code, worker.last_test))
        result.addError(test, (RemoteFailure, RemoteFailure(text), None))


####################################################################################################
#  The worker: runs the modules it is given, reports each outcome
####################################################################################################

class ReportingResult(unittest.TestResult):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def _send(self, test, kind: str, **fields) -> None:
        event = {"id": test.id(), "description": str(test), "kind": kind, **fields}
        self.out.write((json.dumps(event) + "\n").encode())
        self.out.flush()

    def startTest(self, test):
        super().startTest(test)
        self._send(test, "start")

    def stopTest(self, test):
        super().stopTest(test)
        self._send(test, "stop")

    def addSuccess(self, test):
        super().addSuccess(test)
        self._send(test, "success")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._send(test, "failure", text=self.failures[-1][1])

    def addError(self, test, err):
        super().addError(test, err)
        self._send(test, "error", text=self.errors[-1][1])

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            text = (self.failures if failed else self.errors)[-1][1]
            self._send(subtest, "failure" if failed else "error", text=text)

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._send(test, "skip", reason=reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._send(test, "expected_failure", text=self.expectedFailures[-1][1])

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._send(test, "unexpected_success")


def worker_main() -> int:
    out = os.fdopen(int(os.environ.pop("JOBRUNNER_TEST_RESULTS")), "wb")
    loader = unittest.TestLoader()
    for line in sys.stdin:
        module = line.strip()
        result = ReportingResult(out)
        loader.loadTestsFromName(module).run(result)
        out.write(b'{"done": %s}\n' % json.dumps(module).encode())
        out.flush()
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    sys.exit(worker_main())
