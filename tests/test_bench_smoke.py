"""The benchmarks keep working: bench/run.py --quick --json runs every group at tiny sizes."""
import importlib.util
import json
import os
import subprocess
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "run.py")


class BenchSmokeTest(unittest.TestCase):
    def test_quick_run_reports_every_figure_with_its_baseline(self):
        out = subprocess.run([sys.executable, BENCH, "--quick", "--json"], capture_output=True,
                             text=True, timeout=300)
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        doc = json.loads(out.stdout)
        names = {f["name"] for f in doc["figures"]}
        for name in ("enqueue_pipelined", "enqueue_batch", "enqueue_clients_1",
                     "enqueue_clients_16", "noop_jobs", "start_latency", "jobctl_add",
                     "rss_per_pending_job_5000", "restart_5000_pending",
                     "enqueue_at_5000_pending", "machine_fdatasync", "machine_cow_fault",
                     "machine_fork_exit"):
            self.assertIn(name, names)
        for f in doc["figures"]:
            value = f["value"]
            self.assertGreater(value["median"], 0, f)
            self.assertLessEqual(value["min"], value["median"], f)
            self.assertLessEqual(value["median"], value["max"], f)
            if f["name"].startswith(("enqueue", "noop", "start", "jobctl", "restart",
                                     "machine_fork")):
                self.assertIsNotNone(f["baseline"], f)
            if f["baseline"] is not None:
                self.assertGreater(f["ratio"], 0, f)
                self.assertAlmostEqual(f["ratio"], value["median"] / f["baseline"]["median"])
        spec = importlib.util.spec_from_file_location("bench_run", BENCH)
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        text = bench.render(doc)            # what people read: a line per figure
        for f in doc["figures"]:
            self.assertIn(f["name"], text)


if __name__ == "__main__":
    unittest.main()
