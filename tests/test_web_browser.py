"""The dashboard in a real browser (issue #18, items 4 and 5), and the harness that drives it.

One headless Chromium for the whole module (setUpModule), driven by tests/browser.py over the
DevTools protocol. Without a browser the browser tests are skipped, the reason printed once
(.ci/run installs one where it can); the WebSocket client's own tests run anyway.

- `WebSocketTest`: the client's framing against a scripted server on a socket pair
  (fragments with a ping between them, 16- and 64-bit lengths, the closing handshake, a wrong
  accept key), no browser needed.
- `CiRunTest`: `.ci/run` with stand-ins for apt-get, sudo and id on a PATH of their own: it
  installs Chromium only where none is found and apt-get is usable, updates the package lists
  only when the install fails without them, says why when it cannot, and runs the tests anyway.
- `DashboardTest`: the page against a real daemon and a real `jobctl web` (a subprocess on a
  free port): the overview's queues and counts are the `queues` op's, a failed job's page shows
  its traceback, its retry button puts it back (the daemon says so), the jobs table follows
  its filters and a bulk cancel asks with confirm() first, `<script>` and
  `<img onerror>` in a job's args, output and error are shown as text and never run, and
  without the token there is no page (403) while its cookie lets the page's own requests in.
- `HarnessTest`: the harness against static pages served by `http.server` in this process:
  status codes, evaluate, waits, clicks and dialogs, console, screenshots; Chromium's whole
  process group gone after close, after a failing `with` block, and after the test process
  itself is SIGKILLed.
"""
import base64
import hashlib
import http.server
import json
import argparse
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from tests import browser as br
from tests import support
from tests.support import JOBCTL, ROOT, wait_until

BROWSER: br.Browser | None = None
SKIP_REASON: str | None = None      # no browser here: the browser tests skip
START_ERROR: str | None = None      # a browser that does not start: they fail, saying why


def setUpModule():
    global BROWSER, SKIP_REASON, START_ERROR
    path = br.find_chromium()
    if path is None:
        SKIP_REASON = br.NOT_FOUND
        # Said once, also without -v: a skipped browser test must never pass unnoticed.
        sys.stderr.write("test_web_browser: browser tests skipped: %s\n" % SKIP_REASON)
        return
    try:
        BROWSER = br.Browser(path)
    except (br.BrowserError, OSError) as exc:
        START_ERROR = "%s does not start: %s" % (path, exc)


def tearDownModule():
    global BROWSER
    if BROWSER is not None:
        BROWSER.close()
        BROWSER = None


def need_browser(test: unittest.TestCase | None = None) -> br.Browser:
    """The module's browser; skips where there is none, fails where it would not start."""
    if START_ERROR:
        raise AssertionError(START_ERROR)
    if BROWSER is None:
        raise unittest.SkipTest(SKIP_REASON)
    return BROWSER


def group_alive(pgid: int) -> list[int]:
    """The processes of group `pgid` that are not zombies (a zombie has let go of everything;
    its reaping is up to its parent, maybe init)."""
    alive = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue                # gone meanwhile
        if int(fields[2]) == pgid and fields[0] != b"Z":
            alive.append(int(name))
    return alive


####################################################################################################
#  The WebSocket client, against a scripted server
####################################################################################################

def server_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None):
    head = bytes([(0x80 if fin else 0) | opcode])
    n, bit = len(payload), 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


def read_client_frame(sock: socket.socket) -> tuple[int, bytes]:
    """(opcode, unmasked payload) of a frame the client sent; checks that it is masked."""
    f = sock.makefile("rb")
    b0, b1 = f.read(2)
    assert b1 & 0x80, "a client frame must be masked"
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", f.read(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", f.read(8))[0]
    mask = f.read(4)
    data = f.read(n)
    return b0 & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


class WebSocketTest(unittest.TestCase):
    def pair(self):
        client, server = socket.socketpair()
        self.addCleanup(client.close)
        self.addCleanup(server.close)
        server.settimeout(5)
        return br.WebSocket(client), server

    def deadline(self):
        return time.monotonic() + 5

    def test_fragments_with_a_ping_between_and_every_length_encoding(self):
        ws, server = self.pair()
        big = json.dumps({"data": "x" * 70000}).encode()        # a 64-bit length
        medium = "é" * 200                                      # a 16-bit length, UTF-8
        server.sendall(server_frame(br.OP_TEXT, b'{"id": 1, ', fin=False)
                       + server_frame(br.OP_PING, b"are you there")
                       + server_frame(br.OP_CONT, b'"result": ', fin=False)
                       + server_frame(br.OP_CONT, b"{}}", mask=b"\x01\x02\x03\x04")
                       + server_frame(br.OP_TEXT, medium.encode())
                       + server_frame(br.OP_TEXT, big)
                       + server_frame(br.OP_BINARY, b"\x00\xff"))
        self.assertEqual(json.loads(ws.recv(self.deadline())), {"id": 1, "result": {}})
        self.assertEqual(read_client_frame(server), (br.OP_PONG, b"are you there"))
        self.assertEqual(ws.recv(self.deadline()), medium)
        self.assertEqual(ws.recv(self.deadline()), big.decode())
        self.assertEqual(ws.recv(self.deadline()), b"\x00\xff")

    def test_client_frames_are_masked_in_each_length_encoding(self):
        ws, server = self.pair()
        for text in ("short", "m" * 300, "b" * 70000):
            ws.send_text(text)
            self.assertEqual(read_client_frame(server), (br.OP_TEXT, text.encode()))

    def test_close_is_answered_and_ends_the_connection(self):
        ws, server = self.pair()
        server.sendall(server_frame(br.OP_CLOSE, struct.pack("!H", 1001) + b"going away"))
        with self.assertRaisesRegex(ConnectionError, "1001"):
            ws.recv(self.deadline())
        self.assertEqual(read_client_frame(server), (br.OP_CLOSE, struct.pack("!H", 1001)))

    def test_a_silent_server_times_out_and_a_hang_up_is_an_error(self):
        ws, server = self.pair()
        started = time.monotonic()
        with self.assertRaises(TimeoutError):
            ws.recv(time.monotonic() + 0.2)
        self.assertLess(time.monotonic() - started, 3)
        server.sendall(server_frame(br.OP_TEXT, b"abc", fin=False))
        server.shutdown(socket.SHUT_WR)
        with self.assertRaises(ConnectionError):
            ws.recv(self.deadline())

    def test_bad_frames_are_refused(self):
        for frame, error in ((server_frame(br.OP_CONT, b"x"), "continuation"),
                             (bytes([0x80 | 0x3, 0]), "opcode"),
                             (bytes([0x80 | 0x40 | br.OP_TEXT, 0]), "reserved"),
                             (server_frame(br.OP_TEXT, b"a", fin=False)
                              + server_frame(br.OP_TEXT, b"b"), "inside another")):
            with self.subTest(error=error):
                ws, server = self.pair()
                server.sendall(frame)
                with self.assertRaisesRegex(br.BrowserError, error):
                    ws.recv(self.deadline())

    def handshake_server(self, accept):
        """A listening socket answering one handshake with `accept(key)` as the accept key."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)

        def serve():
            conn, _ = listener.accept()
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(4096)
                key = [line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:")][0]
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
                             % accept(key))
                conn.recv(1)                # until the client hangs up
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        return "ws://127.0.0.1:%d/devtools/browser/x" % listener.getsockname()[1]

    def test_handshake_checks_the_accept_key(self):
        good = self.handshake_server(
            lambda key: base64.b64encode(hashlib.sha1(key + br.WS_GUID).digest()))
        br.WebSocket.connect(good, timeout=5).sock.close()
        bad = self.handshake_server(lambda key: base64.b64encode(b"not the hash"))
        with self.assertRaisesRegex(br.BrowserError, "Accept"):
            br.WebSocket.connect(bad, timeout=5)


####################################################################################################
#  .ci/run installs a browser where it can
####################################################################################################

# apt-get's stand-in: logs its arguments (and DEBIAN_FRONTEND); the Nth install succeeds or
# fails as the Nth word of $APT_PLAN says, and a successful one puts a `chromium` on PATH.
APT_GET = r"""#!/bin/sh
echo "$DEBIAN_FRONTEND $*" >> "$STUB/calls"
case "$*" in
  *update*) exit 0 ;;
esac
n=$(grep -c install "$STUB/calls")
if [ "$(echo "$APT_PLAN" | cut -d, -f"$n")" = ok ]; then
  printf '#!/bin/sh\n' > "$STUB/chromium"; chmod +x "$STUB/chromium"; exit 0
fi
echo "E: Unable to locate package chromium"; exit 100
"""
SUDO_OK = '#!/bin/sh\n[ "$1" = -n ] && shift\necho "sudo $*" >> "$STUB/calls"\nexec "$@"\n'
NOT_ROOT = "#!/bin/sh\necho 1000\n"
# The tests themselves are not run again: python3 -m unittest only says that it was reached.
PYTHON = ('#!/bin/sh\nif [ "$1 $2" = "-m unittest" ]; then echo "UNITTEST RAN"; exit 0; fi\n'
          'exec %s "$@"\n' % sys.executable)
TOOLS = ("id", "mktemp", "tail", "sed", "rm", "env", "dirname", "grep", "cut", "chmod", "cat",
         "true")


class CiRunTest(unittest.TestCase):
    def run_ci(self, apt_plan=None, sudo=None, root=True, browser=False, env=None):
        """.ci/run on a PATH of stand-ins; returns (exit code, output, apt-get calls)."""
        stub = tempfile.mkdtemp(prefix="jr-ci-")
        self.addCleanup(shutil.rmtree, stub)
        for tool in TOOLS:
            os.symlink(shutil.which(tool), os.path.join(stub, tool))
        scripts = {"python3": PYTHON}
        if apt_plan is not None:
            scripts["apt-get"] = APT_GET
        if sudo is not None:
            scripts["sudo"] = sudo
        if not root:
            os.unlink(os.path.join(stub, "id"))
            scripts["id"] = NOT_ROOT
        if browser:
            scripts["chromium"] = "#!/bin/sh\n"
        for name, text in scripts.items():
            with open(os.path.join(stub, name), "w") as f:
                f.write(text)
            os.chmod(os.path.join(stub, name), 0o755)
        done = subprocess.run([shutil.which("bash"), os.path.join(ROOT, ".ci", "run")],
                              env={"PATH": stub, "STUB": stub, "APT_PLAN": apt_plan or "",
                                   **(env or {})},
                              capture_output=True, text=True, timeout=60)
        try:
            with open(os.path.join(stub, "calls")) as f:
                calls = f.read().splitlines()
        except FileNotFoundError:
            calls = []
        output = (done.stdout + done.stderr).replace(stub, "STUB")
        self.assertIn("UNITTEST RAN", output)       # whatever happened, the tests run
        return done.returncode, output, calls

    INSTALL = "noninteractive install -y -q --no-install-recommends chromium"

    def test_a_browser_found_is_used_and_nothing_installed(self):
        code, output, calls = self.run_ci(apt_plan="ok", browser=True)
        self.assertEqual((code, calls), (0, []))
        self.assertIn("ci: browser tests use STUB/chromium", output)

    def test_installs_chromium_as_root_and_updates_only_when_needed(self):
        code, output, calls = self.run_ci(apt_plan="ok")
        self.assertEqual(calls, [self.INSTALL])
        self.assertIn("ci: no Chromium found: installing Debian's chromium", output)
        self.assertRegex(output, r"ci: installed STUB/chromium in \d+ s")
        code, output, calls = self.run_ci(apt_plan="fail,ok")
        self.assertEqual(calls, [self.INSTALL, " update -q", self.INSTALL])
        self.assertRegex(output, r"ci: installed STUB/chromium in \d+ s")

    def test_a_failed_install_is_said_and_the_tests_still_run(self):
        code, output, calls = self.run_ci(apt_plan="fail,fail")
        self.assertEqual((code, calls), (0, [self.INSTALL, " update -q", self.INSTALL]))
        self.assertIn("ci: installing chromium failed (the browser tests will skip)", output)
        self.assertIn("ci:   E: Unable to locate package chromium", output)

    def test_without_root_sudo_or_apt_get_it_says_why(self):
        code, output, calls = self.run_ci(apt_plan="ok", root=False)
        self.assertEqual(calls, [])
        self.assertIn("apt-get needs root (no sudo without a password)", output)
        code, output, calls = self.run_ci(apt_plan="ok", root=False, sudo=SUDO_OK)
        self.assertEqual(calls, ["sudo true", "sudo env DEBIAN_FRONTEND=noninteractive apt-get"
                                 " install -y -q --no-install-recommends chromium",
                                 self.INSTALL])
        self.assertIn("ci: installed STUB/chromium", output)
        code, output, calls = self.run_ci()
        self.assertIn("ci: no Chromium and no apt-get here", output)
        # $JOBRUNNER_CHROMIUM naming no browser is no browser, as for the tests themselves
        code, output, calls = self.run_ci(browser=True, env={"JOBRUNNER_CHROMIUM": "nothing"})
        self.assertIn("ci: no Chromium and no apt-get here", output)


####################################################################################################
#  The harness in Chromium, against static pages
####################################################################################################

STATIC = {
    "/index.html": b"""<!doctype html><title>harness</title>
<p id="late" style="height:1.5em"></p>
<button id="ask" onclick="window.answer = confirm('Sure?')">ask</button>
<div id="cover" style="position:fixed;z-index:10;top:0;left:0;width:100%;height:100%;display:none"></div>
<button id="under" style="position:fixed;bottom:10px;right:10px">under</button>
<button id="runaway" style="position:relative;left:0"
 onmousedown="this.style.left = this.style.left === '200px' ? '0px' : '200px'">runaway</button>
<input id="field" oninput="window.typed = this.value">
<script>
console.log("page says", 42);
setTimeout(() => { document.getElementById("late").textContent = "arrived"; }, 100);
</script>""",
}


class StaticHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = STATIC.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if self.path.endswith("?cookie"):
            self.send_header("Set-Cookie", "c=1; Path=/")
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass                                # quiet: the test says what matters


class HarnessTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StaticHandler)
        threading.Thread(target=cls.server.serve_forever, daemon=True).start()
        cls.base = "http://127.0.0.1:%d" % cls.server.server_address[1]

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()
        if cls.shared is not None:
            cls.shared.close()

    shared = None       # one page for the class: a new one costs ~0.2 s

    def setUp(self):
        browser = need_browser()
        if HarnessTest.shared is None:
            HarnessTest.shared = browser.new_page()
        self.page = HarnessTest.shared
        self.page.goto("about:blank")
        self.page.dialog_answer = True
        del self.page.dialogs[:], self.page.console[:]

    def test_goto_evaluate_wait_and_console(self):
        page = self.page
        self.assertEqual(page.goto(self.base + "/index.html"), 200)
        self.assertEqual(page.evaluate("document.title"), "harness")
        self.assertEqual(page.evaluate("Promise.resolve({a: [1, null, 'x']})"),
                         {"a": [1, None, "x"]})
        self.assertIsNone(page.evaluate("undefined"))
        self.assertEqual(page.wait_for("document.getElementById('late').textContent", 10),
                         "arrived")
        self.assertIn(("log", "page says 42"), page.console)
        with self.assertRaisesRegex(br.JSError, "boom"):
            page.evaluate("(() => { throw new Error('boom'); })()")
        with self.assertRaisesRegex(AssertionError, "never.*not defined"):
            page.wait_for("never_defined", timeout=0.3, message="never")
        self.assertEqual(page.goto(self.base + "/missing"), 404)
        self.assertIsNone(page.goto(self.base + "/missing#fragment"))   # same document

    def test_click_answers_dialogs_and_refuses_hidden_or_covered_targets(self):
        page = self.page
        page.goto(self.base + "/index.html")
        page.click("#ask")
        self.assertIs(page.evaluate("window.answer"), True)
        page.dialog_answer = False
        page.click("#ask")
        self.assertIs(page.evaluate("window.answer"), False)
        self.assertEqual(page.dialogs, [("confirm", "Sure?"), ("confirm", "Sure?")])
        with self.assertRaisesRegex(br.BrowserError, "no element"):
            page.click("#nothing")
        # Moved away between press and release: the click goes to the body, every time.
        with self.assertRaisesRegex(br.BrowserError, "runaway was not clicked 3 times: the "
                                    "click landed on <body"):
            page.click("#runaway")
        page.evaluate("document.getElementById('cover').style.display = 'block'")
        with self.assertRaisesRegex(br.BrowserError, "covered"):
            page.click("#under")
        page.set_value("#field", "typed <b>")
        self.assertEqual(page.evaluate("window.typed"), "typed <b>")

    def test_each_page_has_its_own_cookies(self):
        self.page.goto(self.base + "/index.html?cookie")
        self.assertEqual(self.page.evaluate("document.cookie"), "c=1")
        other = BROWSER.new_page()      # a browser context of its own
        self.addCleanup(other.close)
        other.goto(self.base + "/index.html")
        self.assertEqual(other.evaluate("document.cookie"), "")

    def test_screenshot_is_a_png_of_the_viewport(self):
        self.page.goto(self.base + "/index.html")
        path = os.path.join(tempfile.mkdtemp(prefix="jr-shot-"), "shot.png")
        self.addCleanup(lambda: (os.unlink(path), os.rmdir(os.path.dirname(path))))
        size = self.page.screenshot(path)
        with open(path, "rb") as f:
            data = f.read()
        self.assertEqual(len(data), size)
        self.assertEqual(data[:8], b"\x89PNG\r\n\x1a\n")
        self.assertEqual(struct.unpack("!II", data[16:24]), br.VIEWPORT)     # IHDR

    def test_browser_group_is_gone_after_a_failing_block(self):
        need_browser()
        with self.assertRaisesRegex(RuntimeError, "the test failed"):
            with br.Browser() as other:
                pgid = other.proc.pid
                self.assertGreater(len(group_alive(pgid)), 1)   # the browser and its helpers
                raise RuntimeError("the test failed")
        wait_until(lambda: not group_alive(pgid), 10, message="Chromium's group to be gone")

    def test_browser_dies_with_the_test_process(self):
        need_browser()
        script = ("import sys, time; sys.path.insert(0, %r)\n"
                  "from tests.browser import Browser\n"
                  "b = Browser(); print(b.proc.pid, flush=True); time.sleep(60)\n" % ROOT)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                text=True)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        pgid = int(proc.stdout.readline())
        self.assertTrue(group_alive(pgid))
        proc.kill()                         # SIGKILL: no cleanup code of the harness runs
        wait_until(lambda: not group_alive(pgid), 10, message="Chromium's group to be gone")


####################################################################################################
#  The dashboard, against a real daemon and a real `jobctl web`
####################################################################################################

WEB_START_TIMEOUT = 15.0    # s for `jobctl web` to print its URL on a loaded machine
PAGE_TIMEOUT = 15.0         # s for the page to show what the daemon says (it polls each second)
XSS = ("<script>window.__pwned = 'script'</script>",
       "<img src=x onerror=\"window.__pwned = 'img'\">")
# A job whose output and error carry the markup it is given.
XSS_JOB = ("def boom(*texts):\n"
           "    for text in texts:\n"
           "        print(text, flush=True)\n"
           "    raise RuntimeError(' '.join(texts))\n")
# Every element a payload of XSS would have made, anywhere in the document.
INJECTED = "document.querySelectorAll('script:not([src]), img[src=\"x\"], img[onerror]').length"


class WebProcess:
    """`jobctl web --listen 127.0.0.1:0` for a daemon's socket: `url` is the line it printed
    first (http://127.0.0.1:PORT/?token=TOKEN), `base` the same without the token."""

    def __init__(self, socket_path: str):
        self.proc = subprocess.Popen([sys.executable, JOBCTL, "--socket", socket_path, "web",
                                      "--listen", "127.0.0.1:0"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], WEB_START_TIMEOUT)
            line = self.proc.stdout.readline().decode() if ready else ""
            if not line.startswith("http://127.0.0.1:"):
                raise AssertionError("jobctl web printed %r, stderr: %r"
                                     % (line, self.stop()[1]))
        except BaseException:
            self.stop()
            raise
        self.url = line.strip()
        self.base, _, self.token = self.url.partition("/?token=")

    def stop(self) -> tuple[int, str]:
        """SIGTERM (it exits 0), SIGKILL if it does not; returns (exit code, its stderr)."""
        support.terminate(self.proc, 10)
        err = b""
        if not self.proc.stderr.closed:
            err = self.proc.stderr.read()
            self.proc.stdout.close()
            self.proc.stderr.close()
        return self.proc.returncode, err.decode(errors="replace")


def open_route(page: br.Page, url: str, route: str, name: str) -> int:
    """Open the dashboard at `url` + `route` (a hash route) and wait until the page says it
    rendered it (body[data-route] is `name`, data-loaded counted at least once); returns the
    render counter."""
    page.goto(url + route)
    return page.wait_for("document.body && document.body.dataset.route === %s && "
                         "Number(document.body.dataset.loaded) >= 1 && "
                         "Number(document.body.dataset.loaded)" % json.dumps(name),
                         PAGE_TIMEOUT, message="the %s route to render" % name)


def state_shown(state: str) -> str:
    """A JS condition: the job page's state field says `state`."""
    return ("(e => e && e.textContent.trim() === %s)(document.querySelector("
            "'section#job dd[data-field=\"state\"]'))" % json.dumps(state))


class DashboardTest(unittest.TestCase):
    """One daemon, one `jobctl web`, one browser for the class; a fresh page (its own
    cookies) for each test. The jobs are made once, in setUpClass, and each test uses its own."""

    @classmethod
    def setUpClass(cls):
        need_browser()
        cls._tmp = tempfile.TemporaryDirectory(prefix="jr-webb-")
        cls.addClassCleanup(cls._tmp.cleanup)
        root = cls._tmp.name
        os.makedirs(os.path.join(root, "jobs"))
        with open(os.path.join(root, "jobs", "markup.py"), "w") as f:
            f.write(XSS_JOB)
        cls.daemon = support.Daemon(root, allow=["examples.*:*", "markup:*"],
                                    queues={"mail": {"workers": 1},
                                                  "reports": {"workers": 2}},
                                    schedules={"nightly": {"target": "examples.jobs:ExampleJob",
                                                           "every": 3600}})
        cls.daemon.start()
        cls.addClassCleanup(cls.daemon.stop)
        d = cls.daemon
        cls.done = [d.add(args=[i]) for i in range(3)]
        cls.traceback_id = d.add("examples.jobs:ErrorJob", queue="reports", retries=0)
        cls.retry_id = d.add("examples.jobs:ErrorJob", queue="reports", retries=0)
        cls.xss_id = d.add("markup:boom", args=list(XSS), retries=0)
        for job_id in (*cls.done, cls.traceback_id, cls.retry_id, cls.xss_id):
            d.wait_job(job_id)
        # Pending jobs that stay pending: their queue is paused (the overview shows it).
        assert d.call(op="pause", queue="mail")["ok"]
        cls.pending = [d.add(queue="mail", args=["later"]) for _ in range(2)]
        cls.web = WebProcess(d.socket)
        cls.addClassCleanup(cls.web.stop)

    def setUp(self):
        self.page = BROWSER.new_page()
        self.addCleanup(self.page.close)
        self.addCleanup(self.assert_console_clean, self.page)

    def assert_console_clean(self, page: br.Page):
        """The page threw nothing and logged no error or warning (aside from the 403s asked
        for, and the icon the browser asks for when it shows a JSON reply)."""
        self.assertEqual([m for m in page.console if m[0] in ("exception", "error", "warning")
                          and "status of 403" not in m[1] and "/favicon.ico" not in m[1]], [])

    def assert_nothing_ran(self, page: br.Page):
        """No payload ran, none became an element, and the CSP had nothing to block (it
        would have, had the page put the text in as HTML)."""
        self.assertIsNone(page.evaluate("window.__pwned"))
        self.assertEqual(page.evaluate(INJECTED), 0)
        self.assertEqual([m for m in page.console if "Content Security Policy" in m[1]], [])

    def test_overview_shows_the_queues_and_their_counts(self):
        page = self.page
        open_route(page, self.web.url, "#/", "overview")
        queues = self.daemon.call(op="queues")["queues"]
        expected = {q["name"]: {"paused": q["paused"], **{state: str(n) for state, n in
                                                           q["counts"].items()}}
                    for q in queues}
        # Counts no other test changes (the others change mail's and reports' in any order).
        self.assertEqual((expected["default"]["succeeded"], expected["default"]["failed"]),
                         ("3", "1"))
        self.assertTrue(expected["mail"]["paused"])
        # The page polls: wait until it shows the daemon's counts, all of them.
        shown = page.wait_for("""(expected => {
            const rows = {};
            for (const tr of document.querySelectorAll("table#queues tr[data-queue]")) {
                const row = {paused: tr.hasAttribute("data-paused")};
                for (const td of tr.querySelectorAll("td[data-state]"))
                    row[td.dataset.state] = td.textContent.trim() || "0";
                rows[tr.dataset.queue] = row;
            }
            window.__shown = rows;
            return Object.keys(expected).every(q => rows[q] && Object.keys(expected[q]).every(
                k => rows[q][k] === expected[q][k])) && rows;
        })(%s)""" % json.dumps(expected), PAGE_TIMEOUT,
            message="the overview to show %s (it shows window.__shown)" % expected)
        self.assertEqual(sorted(shown), ["default", "mail", "reports"])
        self.assertTrue(page.query('table#queues tr[data-queue="mail"] '
                                   'button[data-action="resume"]'))
        self.assertTrue(page.query('table#schedules tr[data-schedule="nightly"] '
                                   'button[data-action="trigger"]'))
        self.assertTrue(page.query("#throughput"))
        self.assertEqual(page.evaluate("document.querySelector('#status').dataset.state"), "ok")
        self.assert_nothing_ran(page)       # the overview may list recent failures: XSS's too

    def test_a_failed_jobs_page_shows_its_traceback(self):
        page, job_id = self.page, self.traceback_id
        open_route(page, self.web.url, "#/job/%d" % job_id, "job")
        selector = 'section#job[data-job-id="%d"]' % job_id
        output = page.wait_for("(e => e && e.textContent.includes('Traceback') && "
                               "e.textContent)(document.querySelector(%s))"
                               % json.dumps(selector + " pre#job-output"),
                               PAGE_TIMEOUT, message="the traceback in pre#job-output")
        self.assertIn("RuntimeError: ErrorJob always fails (attempt 1)", output)
        self.assertIn("ErrorJob: attempt 1, about to fail", output)
        self.assertEqual(output, self.daemon.call(op="output", id=job_id)["data"])
        self.assertEqual(page.text(selector + ' dd[data-field="state"]').strip(), "failed")
        self.assertEqual(page.text(selector + ' dd[data-field="target"]').strip(),
                         "examples.jobs:ErrorJob")

    def test_retry_clicked_on_a_failed_job_puts_it_back(self):
        page, job_id, d = self.page, self.retry_id, self.daemon
        # Its queue paused first: put back, it stays pending (it would fail again at once).
        # (Left paused: the other tests see the same counts in any order.)
        self.assertTrue(d.call(op="pause", queue="reports")["ok"])
        open_route(page, self.web.url, "#/job/%d" % job_id, "job")
        page.wait_for(state_shown("failed"), PAGE_TIMEOUT)
        page.click('section#job button[data-action="retry"]')
        job = wait_until(lambda: (lambda j: j["state"] == "pending" and j)(d.get(job_id)),
                         PAGE_TIMEOUT, message="the daemon to have the job pending again")
        self.assertEqual(job["attempts"], 0)                    # SPEC §2: they restart at 0
        self.assertEqual([e["event"] for e in d.job_events(job_id)][-2:], ["failed", "queued"])
        page.wait_for(state_shown("pending"), PAGE_TIMEOUT,
                      message="the page to show the job pending")

    def test_markup_in_args_output_and_error_is_text_and_never_runs(self):
        page, job_id = self.page, self.xss_id
        open_route(page, self.web.url, "#/job/%d" % job_id, "job")
        page.wait_for("(e => e && e.textContent.includes('RuntimeError'))(document."
                      "querySelector('pre#job-output'))", PAGE_TIMEOUT)
        args = page.text('section#job dd[data-field="args"]')
        self.assertEqual(json.loads(args), list(XSS))         # JSON text, shown literally
        output = page.text("pre#job-output")
        for text in XSS:
            self.assertIn(text + "\n", output)                  # printed
        self.assertIn("RuntimeError: " + " ".join(XSS), output)     # the traceback
        self.assert_nothing_ran(page)
        # The jobs table has the job too: nothing runs there either.
        page.evaluate("location.hash = '#/jobs'")
        page.wait_for('document.body.dataset.route === "jobs" && '
                      '!!document.querySelector(\'table#jobs tr[data-job-id="%d"]\')' % job_id,
                      PAGE_TIMEOUT)
        self.assert_nothing_ran(page)

    def rows_shown(self, page: br.Page, ids: list[int], what: str):
        """Wait until table#jobs lists exactly `ids`, newest first."""
        return page.wait_for("JSON.stringify([...document.querySelectorAll("
                             "'table#jobs tbody tr[data-job-id]')].map(tr => Number("
                             "tr.dataset.jobId))) === JSON.stringify(%s)" % sorted(ids, reverse=True),
                             PAGE_TIMEOUT, message="table#jobs to list %s %s" % (what, ids))

    def test_jobs_table_filters_and_a_bulk_cancel_asks_first(self):
        page, d = self.page, self.daemon
        open_route(page, self.web.url, "#/jobs?state=pending&queue=mail", "jobs")
        self.rows_shown(page, self.pending, "the pending jobs of mail")
        self.assertEqual(page.text('tr[data-job-id="%d"] td[data-field="state"]'
                                   % self.pending[0]).strip(), "pending")
        page.dialog_answer = False                          # "no": nothing changes
        page.click('button[data-action="bulk-cancel"]')
        self.assertEqual(len(page.dialogs), 1)
        self.assertEqual([d.get(i)["state"] for i in self.pending], ["pending"] * 2)
        page.dialog_answer = True
        page.click('button[data-action="bulk-cancel"]')
        self.assertEqual(len(page.dialogs), 2)
        wait_until(lambda: [d.get(i)["state"] for i in self.pending] == ["cancelled"] * 2,
                   PAGE_TIMEOUT, message="the daemon to have cancelled the filter's jobs")
        self.rows_shown(page, [], "no pending job of mail")
        # The form: another state, and the table follows (the page's own request).
        page.set_value('form#filters select[name="state"]', "cancelled")
        self.rows_shown(page, self.pending, "the cancelled jobs of mail")

    def test_no_token_no_page_and_the_cookie_lets_the_page_in(self):
        page, base = self.page, self.web.base
        # (Every route and file is refused alike: tests/test_web.py checks them over HTTP.)
        for path in ("/", "/?token=" + self.web.token[:-2] + "xx",
                     "/api/job?id=%d" % self.done[0]):
            with self.subTest(path=path):
                self.assertEqual(page.goto(base + path), 403)
                self.assertFalse(page.query("table#queues, section#job"))
                self.assertNotIn("ExampleJob", page.evaluate("document.body.innerText"))
        # With the token once, the HttpOnly cookie it set opens the API to this page alone.
        open_route(page, self.web.url, "#/", "overview")
        self.assertEqual(page.evaluate("document.cookie"), "")          # HttpOnly
        self.assertNotIn(self.web.token, page.evaluate("location.href"))    # out of the bar
        self.assertEqual(page.goto(base + "/api/job?id=%d" % self.done[0]), 200)
        self.assertEqual(json.loads(page.evaluate("document.body.innerText"))["job"]["id"],
                         self.done[0])
        other = BROWSER.new_page()
        self.addCleanup(other.close)
        self.assertEqual(other.goto(base + "/api/job?id=%d" % self.done[0]), 403)


####################################################################################################
#  The README's picture: python3 -m tests.test_web_browser --screenshot docs/dashboard.png
####################################################################################################

SCREENSHOT_SIZE = (1280, 1000)  # px: the overview down to its running jobs and latest failures


def screenshot(path: str) -> None:
    """A daemon with a mix of queues and jobs (succeeded, failed, running, pending, delayed,
    a paused queue, schedules), `jobctl web`, and the overview saved as a PNG at `path`
    after the page has watched jobs finish for a while (its throughput chart)."""
    with tempfile.TemporaryDirectory(prefix="jr-shot-") as root, br.Browser() as browser:
        os.makedirs(os.path.join(root, "jobs"))
        d = support.Daemon(root, workers=3,
                           queues={"emails": {"workers": 4}, "reports": {"workers": 1},
                                   "thumbnails": {"workers": 2}},
                           schedules={"nightly-report": {"target": "examples.jobs:ExampleJob",
                                                         "cron": "0 2 * * *",
                                                         "queue": "reports"},
                                      "cleanup": {"target": "examples.jobs:ExampleJob",
                                                  "every": 900}})
        d.start()
        web = None
        try:
            for i in range(40):
                d.add("examples.jobs:DelayedJob", args=[0.05 * (i % 5)], queue="emails")
            for i in range(12):
                d.add("examples.jobs:ExampleJob", args=["thumb-%d.jpg" % i], queue="thumbnails")
            for i in range(3):
                d.add("examples.jobs:ErrorJob", retries=0, queue="thumbnails")
            d.add("examples.jobs:ErrorJob", retries=2, retry_delay=600)
            d.add("examples.jobs:DelayedJob", args=[600], queue="reports")      # running
            for i in range(5):
                d.add("examples.jobs:ExampleJob", args=["monthly", i], queue="reports")
            d.add("examples.jobs:ExampleJob", args=["tomorrow"], delay=86400)
            web = WebProcess(d.socket)
            page = browser.new_page(*SCREENSHOT_SIZE)
            page.command("Emulation.setScrollbarsHidden", {"hidden": True})
            open_route(page, web.url, "#/", "overview")
            # Work keeps arriving while the page watches, so the chart has a shape.
            for round_ in range(8):
                for i in range(6 + 3 * (round_ % 3)):
                    d.add("examples.jobs:ExampleJob", args=[round_, i], queue="emails")
                seen = int(page.evaluate("document.body.dataset.loaded"))
                page.wait_for("Number(document.body.dataset.loaded) > %d" % seen, PAGE_TIMEOUT)
            d.call(op="pause", queue="thumbnails")
            d.add("examples.jobs:ExampleJob", args=["held"], queue="thumbnails")
            for i in range(6):                  # running when the picture is taken
                d.add("examples.jobs:DelayedJob", args=[60], queue="emails")
            seen = int(page.evaluate("document.body.dataset.loaded"))
            page.wait_for("Number(document.body.dataset.loaded) > %d" % seen, PAGE_TIMEOUT)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            size = page.screenshot(path)
            print("%s: %d bytes, %dx%d" % (path, size, *SCREENSHOT_SIZE))
        finally:
            if web is not None:
                web.stop()
            d.call(op="cancel", where={"state": "running"})
            d.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--screenshot", metavar="PNG",
                        help="save the overview of a filled daemon as PNG (no tests run)")
    known, rest = parser.parse_known_args()
    if known.screenshot:
        screenshot(known.screenshot)
    else:
        unittest.main(argv=[sys.argv[0], *rest])
