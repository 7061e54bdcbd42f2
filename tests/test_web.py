"""`jobctl web`, the dashboard's HTTP server (issue #18, SPEC §4), at the HTTP level (the
browser tests drive the page itself).

- The command: the URL line first on stdout, SIGTERM and Ctrl-C stop it with exit 0, a bad or
  busy --listen exits 2, a daemon killed meanwhile gives 502 with a JSON error.
- The guard: 403 without the token, with a wrong one or a wrong Host; the cookie set from the
  URL's token and accepted; a POST needs the header token; GET on a POST route is 405.
- The API against a real daemon: overview, list (filters, paging both ways), job, output, and
  the actions (cancel, retry, update, pause, resume, trigger, and by filter).
- A slow client holds only its own connection; at most max_connections at once; a client
  trickling its request is cut at its deadline.
- Static files with their types and the security headers; `jobctl add` never imports the
  HTTP server.
"""
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from tests import support
from tests.support import JOBCTL, ROOT, wait_until

import jobctl

URL = re.compile(r"^http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_-]{16,})$")
SLOW = "examples.jobs:ExampleJob"


def request(port, method, path, body=None, headers=None, host=None, timeout=10.0):
    """(status, headers as a lower-case dict, body bytes) of one request on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not False:
            conn.putheader("Host", "127.0.0.1:%d" % port if host is None else host)
        data = None if body is None else (body if isinstance(body, bytes) else
                                          json.dumps(body).encode())
        if data is not None:
            conn.putheader("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders(data)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class Server:
    """jobctl's dashboard server in this process, on a free port, for a daemon's socket."""

    def __init__(self, socket_path, **limits):
        self.app = jobctl.WebApp("tok-" + "x" * 20, jobctl.web_static(),
                                 jobctl.DaemonPool(socket_path))
        self.server = jobctl.web_server(self.app, "127.0.0.1", 0, **limits)
        self.port = self.server.server_address[1]
        self.url = self.app.listening("127.0.0.1", self.port)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.app.pool.close()

    def get(self, path, **kw):
        """GET with the token header; the reply's JSON."""
        headers = {"X-Jobrunner-Token": self.app.token, **kw.pop("headers", {})}
        status, _, body = request(self.port, "GET", path, headers=headers, **kw)
        return status, json.loads(body)

    def post(self, path, doc, **kw):
        headers = {"X-Jobrunner-Token": self.app.token, "Content-Type": "application/json",
                   **kw.pop("headers", {})}
        status, _, body = request(self.port, "POST", path, doc, headers=headers, **kw)
        return status, json.loads(body)


class WebApiTest(unittest.TestCase):
    """One daemon and one server for the class: each test uses jobs of its own."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory(prefix="jr-web-")
        os.makedirs(os.path.join(cls._tmp.name, "jobs"))
        cls.daemon = support.Daemon(cls._tmp.name, queues={"slow": {"workers": 1},
                                                           "lists": {"workers": 1}},
                                    schedules={"nightly": {"target": SLOW, "every": 3600}})
        cls.daemon.start()
        cls.web = Server(cls.daemon.socket)

    @classmethod
    def tearDownClass(cls):
        cls.web.close()
        cls.daemon.stop()
        cls._tmp.cleanup()

    # -- the guard ---------------------------------------------------------------

    def test_token_required_and_checked(self):
        port, token = self.web.port, self.web.app.token
        for path in ("/", "/app.js", "/api/overview", "/api/list", "/nothing"):
            with self.subTest(path=path):
                status, headers, body = request(port, "GET", path)
                self.assertEqual(status, 403)
                self.assertEqual(json.loads(body)["error"]["code"], "forbidden")
                status, _, _ = request(port, "GET", path + "?token=" + token[:-1] + "y")
                self.assertEqual(status, 403)
                status, _, _ = request(port, "GET", path, headers={"Cookie":
                                                                   "jobrunner_token_%d=nope" % port})
                self.assertEqual(status, 403)
        self.assertEqual(request(port, "GET", "/?token=" + token)[0], 200)
        self.assertEqual(request(port, "GET", "/api/overview?token=" + token)[0], 200)

    def test_host_header_checked(self):
        port, token = self.web.port, self.web.app.token
        for host in ("evil.example:%d" % port, "127.0.0.1:%d" % (port + 1), "127.0.0.1",
                     "localhost.evil.example:%d" % port, "10.0.0.1:%d" % port, ""):
            with self.subTest(host=host):
                status, _, body = request(port, "GET", "/?token=" + token, host=host)
                self.assertEqual(status, 403)
                self.assertIn("Host", json.loads(body)["error"]["message"])
        self.assertEqual(request(port, "GET", "/?token=" + token, host=False)[0], 403)
        for host in ("127.0.0.1:%d" % port, "localhost:%d" % port, "LocalHost:%d" % port,
                     "[::1]:%d" % port):
            with self.subTest(host=host):
                self.assertEqual(request(port, "GET", "/?token=" + token, host=host)[0], 200)

    def test_odd_request_lines_get_400_not_500_or_silence(self):
        port, token = self.web.port, self.web.app.token
        for head in ("GET http://[::1/?token=%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                     % (token, port),
                     "POST /api/pause HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Jobrunner-Token: %s"
                     "\r\nContent-Length: \u00b2\r\n\r\n" % (port, token)):
            with self.subTest(head=head.split("\r\n")[0]), \
                    socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(head.encode("latin-1"))    # "²" as one byte, as sent
                reply = b""
                while b"\r\n" not in reply:
                    data = conn.recv(4096)
                    if not data:
                        break
                    reply += data
                self.assertTrue(reply.startswith(b"HTTP/1.1 400 "), reply[:200])

    def test_cookie_set_from_the_url_and_accepted(self):
        port, token = self.web.port, self.web.app.token
        status, headers, body = request(port, "GET", "/?token=" + token)
        self.assertEqual(status, 200)
        cookie = headers["set-cookie"]
        self.assertTrue(cookie.startswith("jobrunner_token_%d=%s;" % (port, token)), cookie)
        for attribute in ("HttpOnly", "SameSite=Strict", "Path=/"):
            self.assertIn(attribute, cookie)
        self.assertIn(token.encode(), body)             # the page's POSTs carry it
        self.assertNotIn(b"{{TOKEN}}", body)
        jar = {"Cookie": "other=1; jobrunner_token_%d=%s" % (port, token)}
        self.assertEqual(request(port, "GET", "/api/overview", headers=jar)[0], 200)
        self.assertEqual(request(port, "GET", "/app.js", headers=jar)[0], 200)
        status, headers, _ = request(port, "GET", "/", headers=jar)
        self.assertEqual(status, 200)
        self.assertNotIn("set-cookie", headers)         # only from the URL's token
        # another dashboard's cookie (another port: the browser sends both) is not ours
        other = {"Cookie": "jobrunner_token_%d=%s; jobrunner_token=%s"
                           % (port + 1, token, token)}
        self.assertEqual(request(port, "GET", "/api/overview", headers=other)[0], 403)

    def test_post_needs_the_header_token(self):
        port, token = self.web.port, self.web.app.token
        body = json.dumps({"queue": "slow"}).encode()
        kind = {"Content-Type": "application/json"}
        # the cookie alone (a form from another site would send it) or the URL's token: no
        cookie = {"Cookie": "jobrunner_token_%d=%s" % (port, token)}
        for headers, path in (({**kind, **cookie}, "/api/pause"),
                              (kind, "/api/pause?token=" + token)):
            status, _, reply = request(port, "POST", path, body, headers=headers)
            self.assertEqual(status, 403, reply)
            self.assertIn("X-Jobrunner-Token", json.loads(reply)["error"]["message"])
        queues = {q["name"]: q for q in self.daemon.call(op="queues")["queues"]}
        self.assertFalse(queues["slow"]["paused"])
        status, reply = self.web.post("/api/pause", {"queue": "slow"},
                                      headers={"Content-Type": "text/plain"})
        self.assertEqual((status, reply["error"]["code"]), (415, "bad_request"))
        status, reply = self.web.post("/api/pause", {"queue": "slow"})
        self.assertEqual((status, reply), (200, {"ok": True, "paused": True}))
        status, reply = self.web.post("/api/resume", {"queue": "slow"})
        self.assertEqual((status, reply), (200, {"ok": True, "paused": False}))

    def test_methods(self):
        for path in ("/api/cancel", "/api/retry", "/api/update", "/api/pause", "/api/resume",
                     "/api/trigger"):
            with self.subTest(path=path):
                status, reply = self.web.get(path)
                self.assertEqual((status, reply["error"]["code"]), (405, "bad_request"))
        status, headers, _ = request(self.web.port, "GET", "/api/cancel",
                                     headers={"X-Jobrunner-Token": self.web.app.token})
        self.assertEqual((status, headers["allow"]), (405, "POST"))
        for path in ("/api/list", "/api/overview", "/"):
            status, reply = self.web.post(path, {})
            self.assertEqual(status, 405)
        status, reply = self.web.get("/etc/passwd")
        self.assertEqual((status, reply["error"]["code"]), (404, "not_found"))
        status, reply = self.web.get("/api/list?limit=x")
        self.assertEqual((status, reply["error"]["code"]), (400, "bad_request"))
        status, reply = self.web.get("/api/list?colour=red")
        self.assertEqual(status, 400)
        self.assertIn("colour", reply["error"]["message"])
        status, reply = self.web.post("/api/cancel", {"id": 1, "force": True})
        self.assertEqual(status, 400)
        status, _, body = request(self.web.port, "POST", "/api/cancel", b"{not json",
                                  headers={"X-Jobrunner-Token": self.web.app.token,
                                           "Content-Type": "application/json"})
        self.assertEqual((status, json.loads(body)["error"]["code"]), (400, "bad_request"))
        status, _, body = request(self.web.port, "POST", "/api/cancel", b"x" * 70000,
                                  headers={"X-Jobrunner-Token": self.web.app.token,
                                           "Content-Type": "application/json"})
        self.assertEqual(status, 413)

    # -- files ---------------------------------------------------------------------

    def test_static_files_and_headers(self):
        port, token = self.web.port, self.web.app.token
        for path, kind in (("/", "text/html"), ("/index.html", "text/html"),
                           ("/app.js", "text/javascript"), ("/app.css", "text/css")):
            with self.subTest(path=path):
                status, headers, body = request(port, "GET", path + "?token=" + token)
                self.assertEqual(status, 200)
                self.assertEqual(headers["content-type"].split(";")[0], kind)
                self.assertTrue(body)
                csp = headers["content-security-policy"]
                self.assertIn("default-src 'self'", csp)
                self.assertIn("script-src 'self'", csp)
                self.assertNotIn("unsafe-inline", csp)
                self.assertEqual(headers["x-content-type-options"], "nosniff")
                self.assertEqual(headers["referrer-policy"], "no-referrer")
        _, _, page = request(port, "GET", "/?token=" + token)
        # no inline script, nothing from elsewhere
        for tag in re.findall(rb"<script[^>]*>", page):
            self.assertIn(b"src=", tag)
        self.assertNotRegex(page, rb"(src|href)=\"(https?:)?//")
        status, headers, _ = request(port, "GET", "/api/overview?token=" + token)
        self.assertEqual(headers["cache-control"], "no-store")
        self.assertEqual(headers["content-type"], "application/json")
        self.assertIn("default-src 'self'", headers["content-security-policy"])

    def test_page_puts_text_in_as_text(self):
        """The page's code never parses strings as markup (the browser tests check the DOM)."""
        with open(os.path.join(ROOT, "web", "app.js"), encoding="utf-8") as f:
            code = f.read()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                     "eval(", "new Function", "setAttribute(\"style", "http://", "https://"):
            self.assertFalse(sink in code.replace("http://www.w3.org/2000/svg", ""), sink)
        with open(os.path.join(ROOT, "web", "index.html"), encoding="utf-8") as f:
            page = f.read()
        self.assertNotRegex(page, r"<script(?![^>]*\bsrc=)")      # no inline script
        self.assertNotRegex(page, r"\son[a-z]+=|\sstyle=|<style")  # no inline handler or style

    # -- the API ---------------------------------------------------------------------

    def test_overview(self):
        status, doc = self.web.get("/api/overview")
        self.assertEqual(status, 200)
        self.assertTrue(doc["ok"])
        self.assertIn("counts", doc["stats"])
        self.assertEqual({q["name"] for q in doc["queues"]}, {"default", "slow", "lists"})
        self.assertEqual([s["name"] for s in doc["schedules"]], ["nightly"])
        self.assertIn("finished_per_second", doc["activity"])

    def test_list_filters_and_paging(self):
        ids = [self.daemon.add(SLOW, queue="lists", delay=3600, args=[n]) for n in range(5)]
        self.daemon.call(op="cancel", id=ids[1])
        status, doc = self.web.get("/api/list?queue=lists")
        self.assertEqual(status, 200)
        self.assertEqual([j["id"] for j in doc["jobs"]], ids[::-1])     # newest first
        self.assertEqual((doc["total"], doc["more"]), (5, False))
        _, doc = self.web.get("/api/list?queue=lists&state=pending&target=examples.*")
        self.assertEqual([j["id"] for j in doc["jobs"]], [ids[4], ids[3], ids[2], ids[0]])
        _, doc = self.web.get("/api/list?queue=lists&state=cancelled&schedule=")
        self.assertEqual([j["id"] for j in doc["jobs"]], [ids[1]])
        _, doc = self.web.get("/api/list?queue=lists&schedule=nightly")
        self.assertEqual(doc["jobs"], [])
        # older pages, then back to newer ones: each page newest first
        _, page = self.web.get("/api/list?queue=lists&limit=2")
        self.assertEqual(([j["id"] for j in page["jobs"]], page["more"]), (ids[:2:-1], True))
        _, page = self.web.get("/api/list?queue=lists&limit=2&before_id=%d" % ids[3])
        self.assertEqual(([j["id"] for j in page["jobs"]], page["more"]),
                         ([ids[2], ids[1]], True))
        _, page = self.web.get("/api/list?queue=lists&limit=2&after_id=%d" % ids[0])
        self.assertEqual(([j["id"] for j in page["jobs"]], page["more"]),
                         ([ids[2], ids[1]], True))
        _, page = self.web.get("/api/list?queue=lists&limit=2&after_id=%d" % ids[2])
        self.assertEqual(([j["id"] for j in page["jobs"]], page["more"]),
                         ([ids[4], ids[3]], False))
        status, doc = self.web.get("/api/list?state=nonsense")
        self.assertEqual((status, doc["error"]["code"]), (400, "bad_request"))
        status, doc = self.web.get("/api/list?queue=nowhere")
        self.assertEqual(status, 200)                       # an unknown queue has no jobs
        self.assertEqual(doc["jobs"], [])

    def test_job_and_output(self):
        text = "<script>alert(1)</script>"
        job_id = self.daemon.add("examples.jobs:echo", args=[text], kwargs={"k": "<b>"})
        self.daemon.wait_job(job_id)
        status, doc = self.web.get("/api/job?id=%d" % job_id)
        self.assertEqual(status, 200)
        self.assertEqual(doc["job"]["args"], [text])            # data, as it is
        self.assertEqual(doc["job"]["state"], "succeeded")
        status, doc = self.web.get("/api/output?id=%d" % job_id)
        self.assertEqual(status, 200)
        self.assertIn(text, doc["data"])
        self.assertTrue(doc["eof"])
        whole = doc["data"]
        _, doc = self.web.get("/api/output?id=%d&offset=5" % job_id)
        self.assertEqual(doc["data"], whole[5:])
        status, doc = self.web.get("/api/job?id=999999")
        self.assertEqual((status, doc["error"]["code"]), (404, "not_found"))
        status, doc = self.web.get("/api/job")
        self.assertEqual(status, 400)

    def test_actions(self):
        a = self.daemon.add(SLOW, queue="slow", delay=3600)
        b = self.daemon.add(SLOW, queue="slow", delay=3600)
        status, doc = self.web.post("/api/update", {"id": a, "priority": 7})
        self.assertEqual((status, doc["job"]["priority"]), (200, 7))
        status, doc = self.web.post("/api/cancel", {"id": a})
        self.assertEqual((status, doc["job"]["state"]), (200, "cancelled"))
        status, doc = self.web.post("/api/cancel", {"id": a})
        self.assertEqual((status, doc["error"]["code"]), (409, "invalid_state"))
        status, doc = self.web.post("/api/retry", {"id": a})
        self.assertEqual((status, doc["job"]["state"]), (200, "pending"))
        status, doc = self.web.post("/api/cancel", {"where": {"queue": "slow"}})
        self.assertEqual((status, sorted(doc["ids"])), (200, [a, b]))
        status, doc = self.web.post("/api/retry", {"where": {"queue": "slow",
                                                             "state": "cancelled"}})
        self.assertEqual((status, sorted(doc["ids"])), (200, [a, b]))
        status, doc = self.web.post("/api/cancel", {"where": {}})
        self.assertEqual(status, 400)
        self.daemon.call(op="cancel", where={"queue": "slow"})
        status, doc = self.web.post("/api/pause", {"schedule": "nightly"})
        self.assertEqual((status, doc["paused"]), (200, True))
        _, doc = self.web.get("/api/overview")
        self.assertTrue(doc["schedules"][0]["paused"])
        status, doc = self.web.post("/api/resume", {"schedule": "nightly"})
        self.assertEqual((status, doc["paused"]), (200, False))
        status, doc = self.web.post("/api/trigger", {"name": "nightly"})
        self.assertEqual(status, 200)
        self.assertEqual(self.daemon.get(doc["id"])["schedule"], "nightly")
        status, doc = self.web.post("/api/trigger", {"name": "weekly"})
        self.assertEqual((status, doc["error"]["code"]), (404, "not_found"))
        status, doc = self.web.post("/api/pause", {"queue": "nowhere"})
        self.assertEqual((status, doc["error"]["code"]), (404, "not_found"))

    def test_keep_alive_answers_without_the_delayed_ack(self):
        """Headers and body are two writes: with Nagle on, each answer on a kept-alive
        connection waited for the client's delayed ACK, 40 ms or more (44 ms measured)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.web.port, timeout=10)
        self.addCleanup(conn.close)
        times = []
        for _ in range(15):
            started = time.perf_counter()
            conn.request("GET", "/api/overview", headers={"X-Jobrunner-Token": self.web.app.token})
            response = conn.getresponse()
            response.read()
            times.append(time.perf_counter() - started)
            self.assertEqual(response.status, 200)
        times.sort()        # the third fastest: a loaded machine slows a few, Nagle all but one
        self.assertLess(times[2], 0.035, times)

    # -- slow clients ------------------------------------------------------------------

    def test_a_silent_client_does_not_block_the_others(self):
        silent = socket.create_connection(("127.0.0.1", self.web.port))
        half = socket.create_connection(("127.0.0.1", self.web.port))
        try:
            half.sendall(b"GET /api/overview HTTP/1.1\r\nHo")
            started = time.monotonic()
            status, doc = self.web.get("/api/overview")
            self.assertEqual(status, 200)
            self.assertLess(time.monotonic() - started, 5.0)    # not the idle timeout (10 s)
        finally:
            silent.close()
            half.close()


class WebLimitsTest(unittest.TestCase):
    """The connection cap and the client deadline, on a server of their own (no daemon)."""

    def serve(self, **limits):
        tmp = tempfile.TemporaryDirectory(prefix="jr-web-")
        self.addCleanup(tmp.cleanup)
        web = Server(os.path.join(tmp.name, "none.sock"), **limits)
        self.addCleanup(web.close)
        return web

    def test_daemon_down_is_502(self):
        web = self.serve()
        status, doc = web.get("/api/overview")
        self.assertEqual((status, doc["ok"], doc["error"]["code"]), (502, False, "unreachable"))
        self.assertIn("none.sock", doc["error"]["message"])

    def test_an_internal_error_is_a_500_and_the_server_goes_on(self):
        import contextlib
        import io
        web = self.serve()
        respond = web.app.respond
        web.app.respond = lambda *args: 1 / 0
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status, _, body = request(web.port, "GET", "/app.js")
        self.assertEqual(status, 500)
        self.assertIn("ZeroDivisionError", err.getvalue())
        web.app.respond = respond
        self.assertEqual(request(web.port, "GET", "/app.js?token=" + web.app.token)[0], 200)

    def test_connection_cap(self):
        web = self.serve(max_connections=2)
        held = [socket.create_connection(("127.0.0.1", web.port)) for _ in range(2)]
        try:
            # accepted in order: the two held ones have their slots before this one comes
            status, _, body = request(web.port, "GET", "/app.js")
            self.assertEqual(status, 503)
        finally:
            held.pop().close()
        wait_until(lambda: request(web.port, "GET", "/app.js?token=" + web.app.token)[0]
                   == 200, 5, message="a slot free again")
        for s in held:
            s.close()

    def test_a_trickling_client_is_cut_at_its_deadline(self):
        web = self.serve(client_deadline=0.5, idle_timeout=5.0)
        started = time.monotonic()      # before the connect: the server counts from its accept,
        sock = socket.create_connection(("127.0.0.1", web.port))    # which may come before
        self.addCleanup(sock.close)                                 # connect() returns here
        request_bytes = iter(b"GET /app.js HTTP/1.1\r\nX-Padding: " + b"a" * 1000)

        def closed():
            # one byte at a time, each well within the idle timeout
            sock.sendall(bytes([next(request_bytes)]))
            ready, _, _ = select.select([sock], [], [], 0.05)
            return ready and sock.recv(100) == b""
        wait_until(closed, 10, interval=0.0, message="the server to close the connection")
        self.assertGreaterEqual(time.monotonic() - started, 0.5)


class WebCommandTest(support.DaemonTestCase):
    """`jobctl web` as a command, on a daemon of its own."""

    def web(self, *args):
        proc = subprocess.Popen([sys.executable, JOBCTL, "--socket", self.daemon.socket, "web",
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        self.addCleanup(proc.stderr.close)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        return proc

    def first_line(self, proc):
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        self.assertTrue(ready, "no URL line within 20 s")
        return proc.stdout.readline().decode().rstrip("\n")

    def test_url_line_daemon_gone_and_clean_stops(self):
        proc = self.web("--listen", "127.0.0.1:0")
        url = self.first_line(proc)
        found = URL.match(url)
        self.assertTrue(found, url)
        port, token = int(found.group(1)), found.group(2)
        status, headers, page = request(port, "GET", "/?token=" + token)
        self.assertEqual(status, 200)
        status, _, body = request(port, "GET", "/api/overview?token=" + token)
        self.assertEqual(status, 200)
        # a busy port: exit 2 with a message
        busy = subprocess.run([sys.executable, JOBCTL, "--socket", self.daemon.socket, "web",
                               "--listen", "127.0.0.1:%d" % port], capture_output=True,
                              text=True, timeout=30)
        self.assertEqual(busy.returncode, 2, busy)
        self.assertIn("127.0.0.1:%d" % port, busy.stderr)
        self.assertNotIn("Traceback", busy.stderr)
        self.assertEqual(busy.stdout, "")
        # the daemon dies: 502 with a JSON error (the pooled connection is dead, too)
        self.daemon.kill()
        for _ in range(2):
            status, headers, body = request(port, "GET", "/api/overview?token=" + token)
            self.assertEqual(status, 502)
            self.assertEqual(json.loads(body)["error"]["code"], "unreachable")
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(20), 0)
        err = proc.stderr.read().decode()
        self.assertNotIn("Traceback", err)
        # Ctrl-C
        proc = self.web("--listen", "127.0.0.1:0")
        self.assertTrue(URL.match(self.first_line(proc)))
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(20), 0)
        self.assertNotIn("Traceback", proc.stderr.read().decode())

    def test_bad_listen(self):
        for listen in ("nonsense", "127.0.0.1:http", "127.0.0.1:70000", "::1:80",
                       "256.1.1.1:0"):
            with self.subTest(listen=listen):
                out = subprocess.run([sys.executable, JOBCTL, "web", "--listen", listen],
                                     capture_output=True, text=True, timeout=30)
                self.assertEqual(out.returncode, 2, out)
                self.assertIn("--listen", out.stderr)
                self.assertNotIn("Traceback", out.stderr)

    def test_web_is_in_usage_and_completion(self):
        out = subprocess.run([sys.executable, JOBCTL, "completion", "bash"],
                             capture_output=True, text=True, timeout=30)
        self.assertRegex(out.stdout, r"web\) COMPREPLY=.*--listen")
        out = subprocess.run([sys.executable, JOBCTL, "--help"], capture_output=True,
                             text=True, timeout=30)
        self.assertIn("web", out.stdout)


class WebLightImportTest(unittest.TestCase):
    """SPEC §4: `jobctl add` and the other commands never import an HTTP server."""

    HEAVY = ("http.server", "socketserver", "http.client", "secrets")

    def test_other_commands_never_load_the_server(self):
        for args in (["add", SLOW], ["list"]):
            with self.subTest(args=args):
                self.assertEqual(support.jobctl_loads(self.HEAVY, *args), [])
        code, imported = support.jobctl_importtime("add", SLOW)
        self.assertEqual(code, 3)
        self.assertIn("socket", imported)               # (the probe sees imports at all)
        self.assertFalse({"http.server", "socketserver", "secrets"} & imported, imported)


if __name__ == "__main__":
    unittest.main()
