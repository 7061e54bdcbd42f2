"""The daemon's client-side parts, each alone (issue #13, item 1): Connections with a stand-in
protocol and no Daemon, Waiters and Pass with a bare Loop. Nothing here starts a job process."""

import functools
import json
import os
import selectors
import socket
import sys
import tempfile
import types
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jobrunnerd as jr  # noqa: E402

DEADLINE = 10.0             # s for a reply to come back through a socketpair on a loaded machine


class Echo:
    """A stand-in for Protocol: each line's reply is the line itself; a line "hold" gets a slot
    that the test fills later (as a wait's is), and a line "change" is a changing request."""

    def __init__(self, this_pass: jr.Pass):
        self.this_pass = this_pass
        self.held: list[tuple] = []

    def handle_line(self, conn: jr.Connection, line: bytes) -> list:
        if line == b"hold":
            slot = [None]
            self.held.append((conn, slot))
            return slot
        slot = [line + b"\n"]
        if line == b"change":
            self.this_pass.batch_slots.append(slot)
        return slot


class PartsCase(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name
        self.cfg = jr.load_config(None, {"socket": os.path.join(self.tmp, "s.sock"),
                                         "state_dir": os.path.join(self.tmp, "state"),
                                         "log_dir": os.path.join(self.tmp, "logs")})
        self.loop = jr.Loop()
        self.addCleanup(self.loop.sel.close)
        self.this_pass = jr.Pass()
        self.waits = jr.Waiters(self.loop, self.this_pass)
        self.protocol = Echo(self.this_pass)
        store = types.SimpleNamespace(sync_seconds=0.0)     # gather() reads only this
        self.conns = jr.Connections(self.cfg, self.loop, store, self.this_pass, self.waits,
                                    self.protocol)

    def connect(self) -> tuple[jr.Connection, socket.socket]:
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        conn = jr.Connection(ours, os.getuid())
        conn.on_event = functools.partial(self.conns.on_client, conn)
        self.conns.conns.add(conn)
        self.loop.watch(conn.fd, selectors.EVENT_READ, "client", conn.on_event)
        self.addCleanup(self.conns.close, conn)
        theirs.settimeout(DEADLINE)
        return conn, theirs

    def serve(self, timeout: float = DEADLINE) -> None:
        """The client half of one loop pass: requests, then (no commit here) the replies."""
        clients = [(key.data[1], mask) for key, mask in self.loop.sel.select(timeout)]
        self.conns.serve(clients)
        self.this_pass.committed()

    @staticmethod
    def read_lines(peer: socket.socket, n: int) -> list[bytes]:
        data = b""
        while data.count(b"\n") < n:
            chunk = peer.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.splitlines()


class ConnectionsAloneTest(PartsCase):
    def test_pipelined_lines_are_answered_in_order_after_the_flush(self):
        conn, peer = self.connect()
        peer.sendall(b"one\nchange\nthree\n")
        self.serve()
        self.assertEqual(len(self.this_pass.batch_slots), 0)    # committed() emptied it
        peer.setblocking(False)
        self.assertRaises(BlockingIOError, peer.recv, 4096)     # nothing before the flush
        peer.setblocking(True)
        self.conns.flush()
        self.assertEqual(self.read_lines(peer, 3), [b"one", b"change", b"three"])
        self.assertEqual(self.conns.reply_bytes, 0)             # the kernel took them all

    def test_a_held_reply_holds_back_the_later_requests(self):
        conn, peer = self.connect()
        peer.sendall(b"hold\nafter\n")
        self.serve()
        self.conns.flush()
        self.assertTrue(conn.waiting())
        self.assertEqual(len(conn.slots), 1, "the request after the held one waits its turn")
        (held_conn, slot), = self.protocol.held
        slot[0] = b"held\n"
        self.this_pass.answered(held_conn)
        self.serve(timeout=0)
        self.conns.flush()
        self.assertEqual(self.read_lines(peer, 2), [b"held", b"after"])

    def test_a_line_over_max_request_bytes_is_too_large_and_the_end(self):
        self.cfg.max_request_bytes = 1000       # the line fits in the socket's buffer
        conn, peer = self.connect()
        peer.sendall(b"x" * (self.cfg.max_request_bytes + 1))
        while not conn.closed and not conn.eof:
            self.serve()
        self.conns.flush()
        [line] = self.read_lines(peer, 1)
        self.assertEqual(json.loads(line)["error"]["code"], "too_large")
        self.assertTrue(conn.closed)
        self.assertEqual(peer.recv(4096), b"")

    def test_accept_and_refuse_past_max_connections(self):
        self.cfg.max_connections = 1
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.cfg.socket)
        listener.listen(4)
        listener.setblocking(False)
        self.conns.listener = listener
        self.addCleanup(self.conns.close_listener)
        self.conns.start_accepting()
        peers = []
        for _ in range(2):
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.settimeout(DEADLINE)
            self.addCleanup(peer.close)
            peer.connect(self.cfg.socket)
            peers.append(peer)
        while len(self.conns.conns) < 1:    # one accept() burst takes both: both connected
            self.serve()
        [line] = self.read_lines(peers[1], 1)
        self.assertEqual(json.loads(line)["error"]["code"], "busy")
        for conn in list(self.conns.conns):
            self.addCleanup(self.conns.close, conn)
        self.assertEqual(len(self.conns.conns), 1)


class WaitersAloneTest(PartsCase):
    def job(self, job_id: int) -> jr.Job:
        return jr.Job(id=job_id, target="examples.jobs:add", state=jr.SUCCEEDED)

    def test_a_wait_is_answered_when_its_job_ends_and_its_timer_is_cancelled(self):
        conn, _ = self.connect()
        slot = [None]
        self.waits.add(7, conn, slot, 30.0, lambda *a: self.fail("timed out"))
        self.assertIn(7, self.waits)
        self.assertEqual(self.this_pass.new_waiters[0][0], 7)
        self.waits.resolve(self.job(7))
        self.assertEqual(json.loads(slot[0])["done"], True)
        self.assertNotIn(7, self.waits)
        self.assertIn(conn, self.this_pass.dirty)
        self.assertIn(conn, self.this_pass.resume)
        self.assertIsNone(self.loop.next_timer())

    def test_a_client_that_leaves_takes_its_waits_with_it(self):
        gone, _ = self.connect()
        stays, _ = self.connect()
        self.waits.add(7, gone, [None], 30.0, lambda *a: None)
        kept = [None]
        self.waits.add(7, stays, kept, None, lambda *a: None)
        gone.slots.append([None])       # it waits: close() drops its waits
        self.conns.close(gone)
        self.assertEqual([entry[0] for entry in self.waits.by_job[7]], [stays])
        self.assertIsNone(self.loop.next_timer())
        self.waits.end_all(b"stopping\n")
        self.assertEqual((kept, self.waits.by_job), ([b"stopping\n"], {}))


class PassTest(unittest.TestCase):
    def test_a_commit_empties_what_it_answered_and_keeps_the_rest(self):
        p = jr.Pass()
        conn = object()
        p.batch_slots.append([b"x"])
        p.report_slots.append([b"y"])
        p.new_waiters.append((1, []))
        p.unsynced_ends.add(1)
        self.assertTrue(p.needs_sync([]))
        p.answered(conn)
        p.committed()
        self.assertEqual((p.batch_slots, p.report_slots, p.new_waiters), ([], [], []))
        self.assertFalse(p.needs_sync([]))
        self.assertTrue(p.needs_sync([object()]))
        self.assertEqual((p.unsynced_ends, p.dirty, p.resume), ({1}, {conn}, {conn}))


if __name__ == "__main__":
    unittest.main()
