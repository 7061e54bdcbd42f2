"""bench/run.py --only peers: jobrunner's figures beside tsp's and beanstalkd's from the same run,
each with its ratio and the issue's goal; a peer that is not installed is skipped with the
command that installs it."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "run.py")
INSTALL = "apt-get install task-spooler beanstalkd"
# figure -> (the peer it needs, the goal as a ratio to that peer, or None)
FIGURES = {"peers_noop_fresh": ("tsp", 0.5), "peers_noop_fresh_preload": ("tsp", 0.5),
           "peers_noop_fresh_tsp_python": ("tsp", None),
           "peers_noop_reuse": ("tsp", 2.0),
           "peers_add_pipelined": ("beanstalkd", 0.4), "peers_add_pipelined_f0": ("beanstalkd", None),
           "peers_add_batch": ("beanstalkd", 1.0), "peers_add_batch_f0": ("beanstalkd", None)}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def run_bench(*args, env=None) -> tuple[dict, str]:
    """The JSON document and the rendered text of one --quick --only peers run."""
    out = subprocess.run([sys.executable, BENCH, "--quick", "--only", "peers", "--json", *args],
                         capture_output=True, text=True, timeout=120, env=env)
    if out.returncode != 0:
        raise AssertionError(out.stderr[-3000:])
    doc = json.loads(out.stdout)
    return doc, load_bench().render(doc)


class BenchPeersTest(unittest.TestCase):
    def test_each_figure_is_beside_its_peer_with_ratio_and_goal_or_skipped_with_why(self):
        doc, text = run_bench()
        figures = {f["name"]: f for f in doc["figures"]}
        skipped = {f["name"]: f["skipped"] for f in doc["skipped"]}
        self.assertEqual(set(figures) | set(skipped), set(FIGURES))
        self.assertFalse(set(figures) & set(skipped))
        for name, (peer, goal) in FIGURES.items():
            if name in skipped:
                if shutil.which(peer) is None:
                    self.assertIn(INSTALL, skipped[name])
                else:           # only the reuse line may be missing with its peer installed
                    self.assertEqual(name, "peers_noop_reuse")
                    self.assertIn("not built", skipped[name])
                print("\n%s skipped: %s" % (name, skipped[name]), end=" ", file=sys.stderr)
                self.assertIn("%s skipped: %s" % (name, skipped[name]), " ".join(text.split()))
                continue
            f = figures[name]
            self.assertEqual(f["unit"], "jobs/s")
            self.assertIn(peer, f["baseline_name"])
            self.assertGreater(f["value"]["median"], 0, f)
            self.assertGreater(f["baseline"]["median"], 0, f)
            self.assertAlmostEqual(f["ratio"], f["value"]["median"] / f["baseline"]["median"])
            self.assertEqual(f["goal"], goal)
            line = next(line for line in text.splitlines() if line.startswith(name + " "))
            self.assertIn("x%.2f" % f["ratio"], line)
            if goal is None:
                self.assertNotIn("goal", line)
            else:           # tiny sizes say nothing about a goal
                self.assertIn("goal x%.2f: not judged at --quick sizes" % goal, line)
        # Both of beanstalkd's fsync modes are beside the same jobrunner figure of this run.
        for name in ("peers_add_pipelined", "peers_add_batch"):
            if name in figures:
                self.assertEqual(figures[name]["value"], figures[name + "_f0"]["value"])
                self.assertNotEqual(figures[name]["baseline"], figures[name + "_f0"]["baseline"])

    def test_a_full_size_line_says_whether_the_goal_is_met(self):
        bench = load_bench()

        def line(ratio, higher_is_better=True):
            value, base = bench.summary([ratio * 100.0]), bench.summary([100.0])
            f = bench.figure("peers_x", "jobs/s", value, base, "a peer", goal=0.5,
                             higher_is_better=higher_is_better)
            return bench.render({"python": "3", "cpus": 2, "runs": 1, "figures": [f]})
        self.assertIn("x0.49   goal x0.50: NOT met", line(0.49))
        self.assertIn("x0.50   goal x0.50: met", line(0.5))
        self.assertIn("x2.00   goal x0.50: met", line(2.0))
        self.assertIn("x0.40   goal x0.50: met", line(0.4, higher_is_better=False))
        self.assertIn("x0.60   goal x0.50: NOT met", line(0.6, higher_is_better=False))

    def test_peers_not_installed_are_skipped_with_the_install_command(self):
        env = dict(os.environ, PATH=os.path.join(ROOT, "no-such-dir"))   # neither peer found
        doc, text = run_bench(env=env)
        self.assertEqual(doc["figures"], [])
        self.assertEqual({f["name"] for f in doc["skipped"]}, set(FIGURES))
        for f in doc["skipped"]:
            self.assertIn(INSTALL, f["skipped"])
            self.assertIn("%s skipped: %s" % (f["name"], f["skipped"]), " ".join(text.split()))


if __name__ == "__main__":
    unittest.main()
