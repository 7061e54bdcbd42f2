"""The benchmarks keep working: bench/run.py --quick --json runs every group at tiny sizes."""
import json
import os
import subprocess
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchSmokeTest(unittest.TestCase):
    def test_quick_run_reports_every_figure_with_its_baseline(self):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick",
                              "--json"], capture_output=True, text=True, timeout=300)
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
            self.assertGreater(f["value"]["median"], 0, f)
            if f["baseline"] is not None:
                self.assertGreater(f["ratio"], 0, f)


if __name__ == "__main__":
    unittest.main()
