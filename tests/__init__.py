"""The test suites. Discovery (`python3 -m unittest`) runs their modules in parallel worker
processes: see tests/parallel.py (JOBRUNNER_TEST_JOBS=1 runs them in one process)."""


def load_tests(loader, standard_tests, pattern):
    from tests import parallel
    return parallel.load(loader, pattern)
