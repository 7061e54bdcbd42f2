"""Attacks on the job process and on pattern queries (SPEC §2 targets and results, §3 patterns
and the 100 ms loop bound). Each case names the defect it provokes:

    WalkOutTest      an allowed pattern (`examples.*:*`) walked out of its module:
                     `examples.jobs:os.system`, `json.codecs.builtins.eval`, a dunder step,
                     a metaclass __getattr__, an instance's __getattr__, an imported class.
                     Dunder steps are a bad_request at add; the rest fail at once, without
                     retry, and a side-effect file proves nothing of the target ran.
    ResultTest       a return value that cannot be kept (5,000 deep, 70 deep, cyclic, not
                     JSON, too large): dropped with a note in the output, the attempt a success.
    ReportTest       malformed reports written to fd 3 (wrong types, not an object, huge, deep,
                     not UTF-8, NaN), with exit 1 and exit 0: the daemon keeps serving, the job
                     fails with "the job process sent an invalid report: ...".
    PatternTest      a `list --target` pattern over 1,024 characters is a bad_request; one of
                     1,024 characters against many distinct targets does not hold a `stats`
                     of another client; its answer equals a plain filter of every job.
"""
import json
import os
import sys
import threading
import time
import unittest

from tests.support import DaemonTestCase, wait_until

ALLOW = ["examples.*:*", "tjobs_*:*"]

# A job module with gadgets that would run code if the target walk used getattr().
WALK_MODULE = r'''
import os
from examples.jobs import ExampleJob as Borrowed
MARK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ran")

def _mark(why):
    with open(MARK, "a") as f:
        f.write(why + "\n")

class Meta(type):
    def __getattr__(cls, name):
        _mark("metaclass getattr " + name)
        return os.system

class Gadget(metaclass=Meta):
    pass

class Sneaky:
    def __getattr__(self, name):
        _mark("instance getattr " + name)
        return os.system

thing = Sneaky()

class Described:
    @property
    def prop(self):
        _mark("property")

    @staticmethod
    def static():
        _mark("static")

class Outer:
    class Inner:
        def handle(self):
            return "inner"

def plain(x):
    return x + 1
'''


class WalkOutTest(DaemonTestCase):
    config = {"allow": ALLOW}

    def prepare(self):
        self.write_job_module("tjobs_walk", WALK_MODULE)
        self.mark = os.path.join(self.root, "jobs", "ran")

    def test_private_steps_are_a_bad_request_at_add(self):
        for target in ("examples.jobs:ExampleJob.__subclasses__", "examples.jobs:_private",
                       "examples.jobs:Outer._Inner", "examples.jobs:__builtins__.eval"):
            reply = self.daemon.call(op="add", target=target)
            self.assertEqual(reply["error"]["code"], "bad_request", (target, reply))
            self.assertIn("'_'", reply["error"]["message"])
        reply = self.daemon.call(op="add_batch", jobs=[
            {"target": "examples.jobs:ExampleJob"},
            {"target": "examples.jobs:ExampleJob.__init__.__globals__"}])
        self.assertEqual(reply["error"]["code"], "bad_request", reply)
        self.assertIn("jobs[1]", reply["error"]["message"])
        self.assertEqual(self.daemon.call(op="list")["jobs"], [])

    def run_refused(self, target, args, why):
        job_id = self.daemon.add(target, args=args, retries=2, retry_delay=0)
        job = self.daemon.wait_job(job_id)
        self.assertEqual(job["state"], "failed", job)
        self.assertEqual(job["attempts"], 1, job)          # permanent: no retry
        self.assertIn("cannot resolve " + target, job["error"])
        self.assertIn(why, job["error"])
        self.assertFalse(os.path.exists(self.mark), "the target ran: %s" % target)

    def test_imported_modules_and_builtins_are_refused(self):
        shell = "touch %s" % self.mark
        self.run_refused("examples.jobs:os.system", [shell], "is a module")
        self.run_refused("examples.jobs:json.codecs.builtins.eval",
                         ["open(%r, 'w')" % self.mark], "is a module")
        self.run_refused("examples.jobs:time.sleep", [0], "is a module")
        self.run_refused("tjobs_walk:Borrowed", [], "defined in examples.jobs, not in tjobs_walk")
        self.run_refused("tjobs_walk:os.system", [shell], "is a module")

    def test_no_code_runs_during_the_walk(self):
        self.run_refused("tjobs_walk:Gadget.system", ["touch %s" % self.mark], "is not defined")
        self.run_refused("tjobs_walk:thing.system", ["touch %s" % self.mark], "Sneaky")
        self.run_refused("tjobs_walk:Described.prop", [], "property")
        self.run_refused("tjobs_walk:Described.static", [], "staticmethod")
        # The method is looked up the same way: a metaclass __getattr__ does not run either.
        job = self.daemon.wait_job(self.daemon.add("tjobs_walk:Gadget", method="system",
                                                   args=["touch %s" % self.mark], retries=2))
        self.assertEqual((job["state"], job["attempts"]), ("failed", 1), job)
        self.assertIn("has no method 'system'", job["error"])
        self.assertFalse(os.path.exists(self.mark))

    def test_what_the_module_defines_still_runs(self):
        for target, args, result in (("examples.jobs:Outer.Inner", [], "inner"),
                                      ("tjobs_walk:Outer.Inner", [], "inner"),
                                      ("tjobs_walk:plain", [41], 42),
                                      ("examples.jobs:add", [1, 2], 3)):
            job = self.daemon.wait_job(self.daemon.add(target, args=args))
            self.assertEqual((job["state"], job["result"]), ("succeeded", result), job)


if __name__ == "__main__":
    unittest.main()
