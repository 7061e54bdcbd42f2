"""The zygote's loop against its socket alone, no daemon: what it does when the daemon closes the
socket with the zygote's replies still unread (a reset, not an end of file), right after a fork
request that carried fds (it must take that as the end, close nothing twice, wait for its
children and exit 0 with a clean stderr), and with requests carrying the wrong number of fds
(none is kept, a fork request gets an error)."""
import json
import os
import select
import socket
import unittest

from tests import support
import jobrunnerd as jr


class ZygoteLoopTest(unittest.TestCase):
    def setUp(self):
        cfg, root = support.temp_config(self)
        self.stderr_path = os.path.join(root, "zygote.stderr")
        self.pid, self.ctl = jr.Zygote.spawn(cfg, dict(os.environ), file_actions=[
            (os.POSIX_SPAWN_OPEN, 2, self.stderr_path, os.O_WRONLY | os.O_CREAT, 0o600)])
        self.addCleanup(self.ctl.close)
        self.addCleanup(self.reap)

    def reap(self):
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    def recv(self):
        ready, _, _ = select.select([self.ctl], [], [], 10)
        self.assertTrue(ready, "no message from the zygote within 10 s")
        return json.loads(self.ctl.recv(65536))

    def test_a_reset_after_a_request_with_fds_ends_it_cleanly(self):
        self.assertEqual(self.recv(), {"ready": True})
        out_r, out_w = os.pipe()
        chan, chan_child = socket.socketpair()
        request = {"token": 1, "job": 7, "attempt": 1, "title": "jobrunner: job 7 attempt 1/1 x:y"}
        socket.send_fds(self.ctl, [json.dumps(request).encode()], [out_w, chan_child.fileno()])
        os.close(out_w)
        chan_child.close()
        started = self.recv()
        self.assertEqual((started["started"], type(started["pid"])), (1, int))
        chan.close()        # no spec comes: the child ends (its exit is the zygote's next reply)
        support.wait_until(lambda: select.select([self.ctl], [], [], 0)[0], 10,
                           message="the child's exit to be reported")
        self.ctl.close()    # with that reply unread: the zygote's next read is a reset
        support.wait_until(lambda: os.waitpid(self.pid, os.WNOHANG)[0] == self.pid, 10,
                           message="the zygote to exit")
        with open(self.stderr_path) as f:
            self.assertNotIn("Traceback", f.read())
        os.close(out_r)

    def test_a_request_with_the_wrong_number_of_fds_keeps_none_of_them(self):
        self.assertEqual(self.recv(), {"ready": True})
        cases = [({"ping": 5}, 1, {"pong": 5}),
                 ({"token": 2, "worker": 1, "once": True}, 2, None),
                 ({"token": 3, "job": 7, "attempt": 1, "title": "t"}, 1, None),
                 ({"token": 4, "job": 7, "attempt": 1, "title": "t"}, 3, None)]
        for request, count, reply in cases:
            with self.subTest(request=request, fds=count):
                pipes = [os.pipe() for _ in range(count)]
                socket.send_fds(self.ctl, [json.dumps(request).encode()], [w for _, w in pipes])
                for _, w in pipes:
                    os.close(w)
                got = self.recv()
                if reply is not None:
                    self.assertEqual(got, reply)
                else:
                    self.assertEqual(got["started"], request["token"])
                    self.assertIn("wrong number of fds", got["error"])
                for r, _ in pipes:      # no copy of a write end is left: the pipe is at its end
                    self.assertTrue(select.select([r], [], [], 10)[0], "a write end is kept")
                    self.assertEqual(os.read(r, 1), b"")
                    os.close(r)
        self.assertEqual(os.waitpid(self.pid, os.WNOHANG), (0, 0), "the zygote is still there")


if __name__ == "__main__":
    unittest.main()
