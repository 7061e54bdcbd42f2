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
- `HarnessTest`: the harness against static pages served by `http.server` in this process:
  status codes, evaluate, waits, clicks and dialogs, console, screenshots; Chromium's whole
  process group gone after close, after a failing `with` block, and after the test process
  itself is SIGKILLed.
"""
import base64
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from tests import browser as br
from tests.support import ROOT, wait_until

BROWSER: br.Browser | None = None
SKIP_REASON: str | None = None


def setUpModule():
    global BROWSER, SKIP_REASON
    path = br.find_chromium()
    if path is None:
        SKIP_REASON = br.NOT_FOUND
    else:
        try:
            BROWSER = br.Browser(path)
        except br.BrowserError as exc:
            SKIP_REASON = "Chromium at %s does not start: %s" % (path, exc)
    if SKIP_REASON:
        # Said once, also without -v: a skipped browser test must never pass unnoticed.
        sys.stderr.write("test_web_browser: browser tests skipped: %s\n" % SKIP_REASON)


def tearDownModule():
    global BROWSER
    if BROWSER is not None:
        BROWSER.close()
        BROWSER = None


def need_browser(test: unittest.TestCase) -> br.Browser:
    if BROWSER is None:
        test.skipTest(SKIP_REASON or "no browser")
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
<p id="late"></p>
<button id="ask" onclick="window.answer = confirm('Sure?')">ask</button>
<div id="cover" style="position:fixed;z-index:10;top:0;left:0;width:100%;height:100%;display:none"></div>
<button id="under" style="position:fixed;bottom:10px;right:10px">under</button>
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

    def setUp(self):
        self.page = need_browser(self).new_page()
        self.addCleanup(self.page.close)

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
        page.evaluate("document.getElementById('cover').style.display = 'block'")
        with self.assertRaisesRegex(br.BrowserError, "covered"):
            page.click("#under")
        page.set_value("#field", "typed <b>")
        self.assertEqual(page.evaluate("window.typed"), "typed <b>")

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
        need_browser(self)
        with self.assertRaisesRegex(RuntimeError, "the test failed"):
            with br.Browser() as other:
                pgid = other.proc.pid
                self.assertGreater(len(group_alive(pgid)), 1)   # the browser and its helpers
                raise RuntimeError("the test failed")
        wait_until(lambda: not group_alive(pgid), 10, message="Chromium's group to be gone")

    def test_browser_dies_with_the_test_process(self):
        need_browser(self)
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


if __name__ == "__main__":
    unittest.main()
