"""A headless Chromium driven over the DevTools protocol, with the standard library only.

    with Browser() as browser:              # BrowserError(NOT_FOUND) where none is found
        page = browser.new_page()           # a tab with cookies of its own
        status = page.goto("http://127.0.0.1:8765/?token=...")     # the document's HTTP status
        page.wait_for("document.body.dataset.loaded >= 1", timeout=10)
        page.click('button[data-action="retry"]')                  # a real mouse click
        page.evaluate("document.title")                            # the value, as JSON gives it
        page.screenshot("overview.png")

Chromium is found by `find_chromium()` ($JOBRUNNER_CHROMIUM, then `chromium`,
`chromium-browser`, `google-chrome` on PATH) and started with `--remote-debugging-port=0` in a
profile of its own; the port it chose is read from `<profile>/DevToolsActivePort`. One WebSocket
(the browser's endpoint) carries every page's commands: each page is a target attached with
`flatten`, its messages tagged with its `sessionId`.

The client is synchronous: a command is sent, then frames are read until its reply comes, every
event met meanwhile being kept with its page (console messages, uncaught exceptions, network
responses) or acted on at once (a `confirm()` or `alert()` is answered as it opens, or the click
that opened it would never return). Every read has a deadline. Chromium runs in a process group
of its own, killed as a whole at the end, also when a test fails, and it dies with the process
that started it (PR_SET_PDEATHSIG), so an interrupted test run leaves no browser behind.

`WebSocket` is a minimal RFC 6455 client: the opening handshake (checking the accept key),
masked client frames, text and binary frames of any length, fragmented messages, a ping answered
with a pong, and the closing handshake.
"""
import base64
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse

# Where to look for a browser, in order (the variable first: a browser outside PATH).
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
ENV_VAR = "JOBRUNNER_CHROMIUM"
# The flags the issue names: headless, no sandbox (root in CI containers cannot have one), and
# nothing that reaches out to the network on its own (updates, sync, field trials, QUIC).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0")
START_TIMEOUT = 30.0        # s: a cold start on a loaded 2-core machine takes a few seconds
COMMAND_TIMEOUT = 30.0      # s: the longest any one DevTools command may take
CLOSE_GRACE = 5.0           # s: Browser.close, then SIGKILL to the whole group
VIEWPORT = (1280, 800)      # px: the size of a page, and of its screenshots
CLICK_TRIES = 3             # aims at an element that moved between aiming and clicking
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"     # RFC 6455 §1.3
MAX_MESSAGE = 64 << 20      # bytes: a full-page screenshot is a few MB of base64; more is a bug
PR_SET_PDEATHSIG = 1


class BrowserError(Exception):
    """The browser could not be started, or the DevTools protocol answered with an error."""


class JSError(BrowserError):
    """A script evaluated in the page threw: the message is the exception's description."""


def find_chromium() -> str | None:
    """The path of a Chromium-like browser, or None: $JOBRUNNER_CHROMIUM, then PATH."""
    named = os.environ.get(ENV_VAR)
    if named:
        return shutil.which(named)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


NOT_FOUND = ("no Chromium found (looked for $%s, %s on PATH; .ci/run installs the Debian "
             "package `chromium` where apt-get is usable)" % (ENV_VAR, ", ".join(CANDIDATES)))


####################################################################################################
#  WebSocket client (RFC 6455), the part of it that DevTools needs
####################################################################################################

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class WebSocket:
    """One client connection. `send_text()` and `recv()` (a whole message, its fragments put
    together, pings answered on the way); every read waits until the deadline given."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()     # appended in place: a screenshot is megabytes in 64 KiB reads
        self.closed = False

    @classmethod
    def connect(cls, url: str, timeout: float = START_TIMEOUT) -> "WebSocket":
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "ws":
            raise BrowserError("only ws:// URLs: %r" % url)
        sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        ws = cls(sock)
        try:
            ws._handshake(parts.netloc, parts.path or "/", time.monotonic() + timeout)
        except BaseException:
            sock.close()
            raise
        return ws

    def _handshake(self, host: str, path: str, deadline: float):
        key = base64.b64encode(os.urandom(16))
        # No Origin header: DevTools refuses WebSocket clients from an origin it was not told
        # to allow (--remote-allow-origins), and a client that is no web page sends none.
        self.sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n"
                          % (path.encode(), host.encode(), key))
        while b"\r\n\r\n" not in self.buf:
            self._fill(deadline)
        head, rest = bytes(self.buf).split(b"\r\n\r\n", 1)
        self.buf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        if lines[0].split(" ")[1:2] != ["101"]:
            raise BrowserError("WebSocket handshake refused: %s" % lines[0])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            raise BrowserError("WebSocket handshake: wrong Sec-WebSocket-Accept %r"
                               % headers.get("sec-websocket-accept"))

    def _fill(self, deadline: float):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer from the browser before the deadline")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            raise TimeoutError("no answer from the browser before the deadline") from None
        if not data:
            self.closed = True
            raise ConnectionError("the browser closed the connection")
        self.buf += data

    def _take(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            self._fill(deadline)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True):
        """One frame, masked as every client frame must be (RFC 6455 §5.3)."""
        head = bytes([(0x80 if fin else 0) | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + _mask(payload, mask))

    def send_text(self, text: str):
        self.send_frame(OP_TEXT, text.encode("utf-8"))

    def recv_frame(self, deadline: float) -> tuple[bool, int, bytes]:
        """(fin, opcode, payload) of the next frame."""
        b0, b1 = self._take(2, deadline)
        fin, opcode, masked, n = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
        if b0 & 0x70:
            raise BrowserError("WebSocket frame with reserved bits set: %#x" % b0)
        if n == 126:
            n = struct.unpack("!H", self._take(2, deadline))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._take(8, deadline))[0]
        if n > MAX_MESSAGE:
            raise BrowserError("WebSocket frame of %d bytes" % n)
        mask = self._take(4, deadline) if masked else None     # servers do not mask; tolerated
        payload = self._take(n, deadline)
        return fin, opcode, (_mask(payload, mask) if mask else payload)

    def recv(self, deadline: float) -> str | bytes:
        """The next whole message: text as str, binary as bytes. Control frames may come
        between the fragments of a message (§5.4): a ping is answered, a close ends."""
        kind, parts, size = None, [], 0
        while True:
            fin, opcode, payload = self.recv_frame(deadline)
            if opcode == OP_PING:
                self.send_frame(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                if not self.closed:
                    self.closed = True
                    try:
                        self.send_frame(OP_CLOSE, payload[:2])
                    except OSError:
                        pass                # the peer went already: nothing to tell it
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise ConnectionError("the browser closed the WebSocket (code %s)" % code)
            if opcode == OP_CONT:
                if kind is None:
                    raise BrowserError("WebSocket continuation frame with no message begun")
            elif opcode in (OP_TEXT, OP_BINARY):
                if kind is not None:
                    raise BrowserError("WebSocket message begun inside another")
                kind = opcode
            else:
                raise BrowserError("WebSocket frame with unknown opcode %#x" % opcode)
            parts.append(payload)
            size += len(payload)
            if size > MAX_MESSAGE:
                raise BrowserError("WebSocket message over %d bytes" % MAX_MESSAGE)
            if fin:
                data = b"".join(parts)
                return data.decode("utf-8") if kind == OP_TEXT else data

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.send_frame(OP_CLOSE, struct.pack("!H", 1000))
            except OSError:
                pass                        # the browser is gone: closing is all that is left
        self.sock.close()


def _mask(data: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte key, repeated (§5.3), a whole message at a time (as one big int:
    a byte-by-byte loop over a multi-megabyte screenshot would take seconds)."""
    if not data:
        return data
    key = (mask * (len(data) // 4 + 1))[:len(data)]
    n = int.from_bytes(data, "big") ^ int.from_bytes(key, "big")
    return n.to_bytes(len(data), "big")


####################################################################################################
#  The browser process and its DevTools connection
####################################################################################################

def _libc_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None                         # not Linux: the group kill at close() still holds


# Looked up here, not in the child: between fork and exec of a threaded test process only
# the simplest calls are safe (dlopen/dlsym take locks another thread may have held).
_PRCTL = _libc_prctl()


def _die_with_parent():
    """In the browser's process, before exec: SIGKILL when the test process dies."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Browser:
    """A headless Chromium and the one DevTools connection to it. Callers use `new_page()`
    and `close()` (or the context manager); pages call `command()` and `wait_event()`."""

    def __init__(self, path: str | None = None, timeout: float = START_TIMEOUT):
        self.path = path or find_chromium()
        if self.path is None:
            raise BrowserError(NOT_FOUND)
        self.tmp = tempfile.mkdtemp(prefix="jr-chromium-")
        self.profile = os.path.join(self.tmp, "profile")
        self.log_path = os.path.join(self.tmp, "chromium.log")
        self.proc = None
        self.ws = None
        self.next_id = 0
        self.replies = {}                   # id -> message, read while waiting for another
        self.pages = {}                     # sessionId -> Page
        try:
            self._start(timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, timeout: float):
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.path, *FLAGS, "--user-data-dir=" + self.profile, "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + timeout
        while True:
            # The file is written whole once the port is bound (port, newline, path).
            try:
                with open(port_file) as f:
                    lines = f.read().split("\n")
                if len(lines) >= 2 and lines[0].isdigit() and lines[1].startswith("/"):
                    break
            except FileNotFoundError:
                pass
            if self.proc.poll() is not None:
                raise BrowserError("%s exited with %s before DevTools listened: %s"
                                   % (self.path, self.proc.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                raise BrowserError("%s: no DevToolsActivePort after %.0f s: %s"
                                   % (self.path, timeout, self.log_tail()))
            time.sleep(0.02)
        self.ws = WebSocket.connect("ws://127.0.0.1:%s%s" % (lines[0], lines[1]),
                                    max(1.0, deadline - time.monotonic()))
        self.version = self.command("Browser.getVersion")["product"]

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    # -- the protocol ---------------------------------------------------------------------------

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self.ws.send_text(json.dumps(message))
        return self.next_id

    def command(self, method: str, params: dict | None = None, session: str | None = None,
                timeout: float = COMMAND_TIMEOUT) -> dict:
        """Send a command and read until its reply; events read meanwhile go to their page."""
        call = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while call not in self.replies:
            self.pump(deadline, method)
        reply = self.replies.pop(call)
        if "error" in reply:
            raise BrowserError("%s: %s" % (method, reply["error"].get("message", reply["error"])))
        return reply.get("result", {})

    def pump(self, deadline: float, waiting_for: str = "an event"):
        """Read one message: a reply is kept by its id, an event handed to its page."""
        try:
            text = self.ws.recv(deadline)
        except TimeoutError:
            raise TimeoutError("DevTools: no answer to %s in time" % waiting_for) from None
        except ConnectionError as exc:
            raise BrowserError("%s while waiting for %s: %s"
                               % (exc, waiting_for, self.log_tail())) from None
        message = json.loads(text)
        if "id" in message:
            self.replies[message["id"]] = message
            return
        page = self.pages.get(message.get("sessionId"))
        if page is not None:
            page.on_event(message["method"], message.get("params", {}))

    # -- pages ------------------------------------------------------------------------------------

    def new_page(self, width: int = VIEWPORT[0], height: int = VIEWPORT[1]) -> "Page":
        """A tab in a browser context of its own (like a private window): no cookie or
        storage from another page, so a test that needs none of the token's cookie has none."""
        context = self.command("Target.createBrowserContext")["browserContextId"]
        target = self.command("Target.createTarget", {"url": "about:blank",
                                                      "browserContextId": context})["targetId"]
        session = self.command("Target.attachToTarget",
                               {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session, context)
        self.pages[session] = page
        for domain in ("Page", "Runtime", "Network", "Log"):
            page.command(domain + ".enable")
        page.command("Page.setLifecycleEventsEnabled", {"enabled": True})   # load, by loaderId
        page.command("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return page

    # -- the end ----------------------------------------------------------------------------------

    def close(self):
        """Ask the browser to quit, then kill its whole process group in any case (renderers,
        zygotes, the crash handler), and remove its profile."""
        if self.ws is not None:
            try:
                self.send("Browser.close")
            except OSError:
                pass                        # gone already: the kill below settles it
            self.ws.close()
            self.ws = None
        if self.proc is not None:
            try:
                self.proc.wait(CLOSE_GRACE)
            except subprocess.TimeoutExpired:
                pass                        # stuck: the group kill below ends it
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass                        # the group is already empty
            if self.proc.poll() is None:
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc):
        self.close()


class Page:
    """One tab. For tests: `goto()`, `evaluate()`, `wait_for()`, `click()`, `set_value()`,
    `screenshot()`, and what the page said: `console` (console.* calls, uncaught exceptions,
    browser log entries, as (kind, text)), `dialogs` ((type, message) of each alert/confirm/
    prompt, answered with `dialog_answer`), `responses` (url -> HTTP status)."""

    def __init__(self, browser: Browser, target: str, session: str, context: str):
        self.browser = browser
        self.target = target
        self.session = session
        self.context = context
        self.console: list[tuple[str, str]] = []
        self.dialogs: list[tuple[str, str]] = []
        self.dialog_answer = True           # accept confirm(): the page's own buttons ask first
        self.responses: dict[str, int] = {}
        self.loaded: list[str] = []         # loaderIds of documents whose load event came
        self.statuses: dict[str, int] = {}  # loaderId -> the HTTP status of its document

    def command(self, method: str, params: dict | None = None,
                timeout: float = COMMAND_TIMEOUT) -> dict:
        return self.browser.command(method, params, self.session, timeout)

    def on_event(self, method: str, params: dict):
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(arg.get("value", arg.get("description", arg.get("type"))))
                            for arg in params.get("args", []))
            self.console.append((params.get("type", "log"), text))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.console.append(("exception", text))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            url = entry.get("url")
            self.console.append((entry.get("level", "log"),
                                 entry.get("text", "") + (" (%s)" % url if url else "")))
        elif method == "Page.javascriptDialogOpening":
            self.dialogs.append((params.get("type", ""), params.get("message", "")))
            # Answered now, without waiting for the reply: the command that opened the
            # dialog (a click, an evaluate) is still waiting for its own.
            self.browser.send("Page.handleJavaScriptDialog",
                              {"accept": bool(self.dialog_answer), "promptText": ""},
                              self.session)
        elif method == "Network.responseReceived":
            response = params.get("response", {})
            self.responses[response.get("url", "")] = response.get("status")
            if params.get("type") == "Document":
                self.statuses[params.get("loaderId")] = response.get("status")
        elif method == "Page.lifecycleEvent":
            if params.get("name") == "load":
                self.loaded.append(params.get("loaderId"))

    def goto(self, url: str, timeout: float = COMMAND_TIMEOUT) -> int | None:
        """Navigate and wait for the load event; returns the document's HTTP status (None for
        a change of the URL's fragment alone, which loads nothing)."""
        deadline = time.monotonic() + timeout
        result = self.command("Page.navigate", {"url": url}, timeout)
        loader = result.get("loaderId")
        if result.get("errorText"):
            # An HTTP error with an empty body is shown as Chromium's own error page: the
            # response came, and its status is what the caller asks about.
            if loader in self.statuses:
                return self.statuses[loader]
            raise BrowserError("navigating to %s: %s" % (url, result["errorText"]))
        if loader is None:
            return None                     # same-document navigation: nothing to wait for
        while loader not in self.loaded:
            self.browser.pump(deadline, "the load event of %s" % url)
        return self.statuses.get(loader)

    def evaluate(self, expression: str, timeout: float = COMMAND_TIMEOUT):
        """The value of `expression` in the page (awaited if it is a promise), as JSON would
        carry it (undefined -> None). A thrown exception raises JSError."""
        result = self.command("Runtime.evaluate",
                              {"expression": expression, "returnByValue": True,
                               "awaitPromise": True, "userGesture": True}, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise JSError(details.get("exception", {}).get("description")
                          or details.get("text", "exception"))
        return result.get("result", {}).get("value")

    def wait_for(self, condition: str, timeout: float = 10.0, interval: float = 0.05,
                 message: str | None = None):
        """Poll the JS expression `condition` until it is truthy; its value is returned. An
        exception counts as false (the page may be between two documents) and is named in the
        failure if the deadline passes."""
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            try:
                value = self.evaluate(condition, max(1.0, deadline - time.monotonic()))
                if value:
                    return value
            except BrowserError as exc:     # JSError, or a context torn down by a navigation
                last_error = exc
            if time.monotonic() > deadline:
                raise AssertionError("timed out after %.1fs waiting for %s%s"
                                     % (timeout, message or condition,
                                        "" if last_error is None else
                                        " (last error: %s)" % last_error))
            time.sleep(interval)

    def query(self, selector: str) -> bool:
        return bool(self.evaluate("!!document.querySelector(%s)" % json.dumps(selector)))

    def text(self, selector: str) -> str | None:
        """The textContent of the first match, None when there is none."""
        return self.evaluate("(e => e && e.textContent)(document.querySelector(%s))"
                             % json.dumps(selector))

    def click(self, selector: str, timeout: float = COMMAND_TIMEOUT):
        """A real mouse click (pressed, released) in the middle of the first element matching
        `selector`, scrolled into view; fails if it is missing, hidden or covered by another.
        Returns once the page's click handlers have run (their synchronous part: a confirm()
        they open is answered by then): the input events themselves are acknowledged before
        the page handles them, so a script evaluated next could run first. A click that
        landed elsewhere (the page moved between aiming and clicking: a late render) is
        aimed again, CLICK_TRIES times in all."""
        for _ in range(CLICK_TRIES):
            box = self.evaluate("""(sel => {
                const e = document.querySelector(sel);
                if (!e) return {error: "no element matches " + sel};
                e.scrollIntoView({block: "center", inline: "center"});
                const r = e.getBoundingClientRect();
                if (r.width === 0 || r.height === 0) return {error: sel + " is not displayed"};
                const x = r.left + r.width / 2, y = r.top + r.height / 2;
                const hit = document.elementFromPoint(x, y);
                if (!hit || !(hit === e || e.contains(hit)))
                    return {error: sel + " is covered by " + (hit ? hit.outerHTML.slice(0, 80) : "nothing")};
                // A task queued as the click begins runs after its whole dispatch: every
                // handler, and any dialog they opened, is done when it records the click.
                const n = (window.__harnessClick ? window.__harnessClick.n : 0) + 1;
                window.addEventListener("click", event => {
                    const landed = event.target === e || e.contains(event.target);
                    const on = event.target.outerHTML ? event.target.outerHTML.slice(0, 80) :
                        String(event.target);
                    setTimeout(() => { window.__harnessClick = {n: n, landed: landed, on: on}; });
                }, {capture: true, once: true});
                return {x: x, y: y, n: n, href: location.href};
            })(%s)""" % json.dumps(selector), timeout)
            if "error" in box:
                raise BrowserError("click: " + box["error"])
            for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
                self.command("Input.dispatchMouseEvent",
                             {"type": kind, "x": box["x"], "y": box["y"], "button": "left",
                              "buttons": 0 if kind == "mouseMoved" else 1, "clickCount": 1},
                             timeout)
            # (A click that loaded another document took the record with the old one.)
            done = self.wait_for("location.href !== %s ? {landed: true} : window.__harnessClick"
                                 " && window.__harnessClick.n >= %d && window.__harnessClick"
                                 % (json.dumps(box["href"]), box["n"]), timeout, interval=0.01,
                                 message="the page to handle the click on " + selector)
            if done["landed"]:
                return
        raise BrowserError("click: %s was not clicked %d times: the click landed on %s"
                           % (selector, CLICK_TRIES, done["on"]))

    def set_value(self, selector: str, value: str):
        """Set a form field's value as typing or choosing would, with its input and change
        events (the page's handlers run as for a person)."""
        ok = self.evaluate("""((sel, v) => {
            const e = document.querySelector(sel);
            if (!e) return false;
            e.focus(); e.value = v;
            e.dispatchEvent(new Event("input", {bubbles: true}));
            e.dispatchEvent(new Event("change", {bubbles: true}));
            return true;
        })(%s, %s)""" % (json.dumps(selector), json.dumps(value)))
        if not ok:
            raise BrowserError("set_value: no element matches " + selector)

    def screenshot(self, path: str) -> int:
        """Save the viewport as a PNG; returns its size in bytes."""
        data = base64.b64decode(self.command("Page.captureScreenshot", {"format": "png"})["data"])
        with open(path, "wb") as f:
            f.write(data)
        return len(data)

    def close(self):
        self.browser.pages.pop(self.session, None)
        self.browser.command("Target.closeTarget", {"targetId": self.target})
        self.browser.command("Target.disposeBrowserContext", {"browserContextId": self.context})
