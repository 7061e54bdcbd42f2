"""Defects where two of the fixes for the "under attack" issues met, found by a review of the
merged code. Each test fails on the merge before its fix.

- A cancelled timer kept its arguments until it was due: an ended attempt with a timeout stayed
  referenced for `timeout` seconds, and a background fold (which freezes what exists out of the
  cycle collector) made that reference permanent.
- SIGHUP when no new zygote can be started (no fd, no memory) left the reload half done: the
  allow list was not re-read and systemd never got READY=1 after RELOADING=1.
- An attempt whose output watch failed (epoll out of memory) after its process was made stayed
  in the runner's active set for good, taking a worker slot, with its process running.
"""
import gc
import os
import tempfile
import unittest
import weakref
from unittest import mock

import jobrunnerd as jr

from tests.support import ROOT, in_process_daemon


class Payload:
    """Something a timer's arguments hold (an attempt, in the daemon)."""


class CancelledTimerTest(unittest.TestCase):

    def test_a_cancelled_timer_lets_go_of_its_arguments(self):
        loop = jr.Loop()
        self.addCleanup(loop.sel.close)
        payload = Payload()
        gone = weakref.ref(payload)
        timer = loop.call_later(3600.0, lambda p: None, payload)
        jr.Loop.cancel(timer)
        del payload
        gc.collect()
        self.assertIsNone(gone(), "a cancelled timer, still in the heap, keeps its arguments")
        self.assertIsNone(loop.next_timer(), "a cancelled timer is never due")


class InProcess(unittest.TestCase):

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="jr-inter-")
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name
        self.config_path = os.path.join(self.root, "jobrunnerd.toml")
        self.write_config('allow = ["examples.*:*"]\n')
        self.cfg = jr.load_config(self.config_path, {
            "socket": os.path.join(self.root, "d.sock"),
            "state_dir": os.path.join(self.root, "state"),
            "log_dir": os.path.join(self.root, "logs"), "start_method": "spawn",
            "workers": 1, "job_paths": [ROOT]})
        self.d = in_process_daemon(self, self.cfg)

    def write_config(self, text: str) -> None:
        with open(self.config_path, "w") as f:
            f.write(text)


class ReloadWithoutAZygoteTest(InProcess):

    def test_sighup_finishes_when_no_new_zygote_can_start(self):
        self.write_config('allow = ["examples.*:*", "reports.*:*"]\n')
        notified = []
        with mock.patch.object(self.d.runner, "restart",
                               side_effect=OSError(24, "Too many open files")), \
                mock.patch.object(jr, "sd_notify", notified.append), \
                mock.patch.object(jr, "say"):
            self.d.reload()
        self.assertIn("reports.*:*", self.d.cfg.allow, "the allow list was not re-read")
        self.assertEqual(notified[-1], "READY=1", notified)


class StartWithAFailingWatchTest(InProcess):

    def test_a_failed_watch_starts_nothing_and_holds_no_slot(self):
        job = self.d.jobs.create(self.d.clock(), [jr.validate_add(
            {"target": "examples.jobs:ExampleJob"}, self.cfg, self.d.clock())])[0]
        real_watch = self.d.loop.watch

        def watch(fd, events, kind, callback):
            if kind == "internal" and fd not in self.d.loop.watched:
                raise OSError(12, "Cannot allocate memory")     # epoll_ctl ENOMEM
            return real_watch(fd, events, kind, callback)
        with mock.patch.object(self.d.loop, "watch", watch), \
                mock.patch.object(os, "posix_spawn", wraps=os.posix_spawn) as spawn:
            with self.assertRaises(OSError):
                self.d.runner.start(job, 1)
        self.assertEqual(self.d.runner.active, {}, "a failed start holds a worker slot")
        self.assertEqual(spawn.call_count, 0, "a process was made for a start that failed")


if __name__ == "__main__":
    unittest.main()
