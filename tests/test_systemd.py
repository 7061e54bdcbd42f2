"""jobrunnerd under systemd: the shipped files, and the daemon's side of the protocol with
systemd, checked without a running systemd.

- The units pass `systemd-analyze verify`; the unit files, the example config, sysusers and
  tmpfiles agree on paths, accounts and timeouts.
- sd_notify: a datagram socket in the test's temp dir (or an abstract "@name") stands in for
  $NOTIFY_SOCKET. READY=1 comes once the state is loaded and the socket answers; STATUS=
  follows changes at a modest rate; RELOADING=1 ... READY=1 frame SIGHUP; STOPPING=1 comes on
  SIGTERM.
- The watchdog: WATCHDOG=1 every WATCHDOG_USEC/2 from the main loop (a stalled loop, the daemon
  held by SIGSTOP for 1.5 s, stops it), and only when WATCHDOG_PID is unset or ours.
- Socket activation through `systemd-socket-activate`, and through a bare fd 3 handed over by a
  tiny launcher; LISTEN_* (and NOTIFY_SOCKET, WATCHDOG_*) never reach a job.
- SIGHUP after logrotate moved the logs: new lines go to new files; `allow` and `limits` are
  re-read; a broken config on reload keeps the daemon running on the old one.
"""
import os
import pwd
import queue
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

from tests.support import DAEMON, ROOT, Daemon, Raw, daemon_env, terminate, wait_until

SYSTEMD_DIR = os.path.join(ROOT, "systemd")
SERVICE = os.path.join(SYSTEMD_DIR, "jobrunnerd.service")
SOCKET_UNIT = os.path.join(SYSTEMD_DIR, "jobrunnerd.socket")
EXAMPLE_CONFIG = os.path.join(SYSTEMD_DIR, "jobrunnerd.toml")
SHIPPED_EXEC_START = "/usr/local/bin/jobrunnerd --config /etc/jobrunner/jobrunnerd.toml"
WATCHDOG_USEC = "400000"                # pings expected every 0.2 s

# Execs the daemon in the same process (so its pid stays the launcher's), the way systemd and
# systemd-socket-activate do: argv = FD NAMES CMD...; FD (unless -1) becomes fd 3 with
# LISTEN_FDS=1; each variable in the comma-separated NAMES is set to this process's pid.
LAUNCHER = r"""
import os, sys
fd = int(sys.argv[1])
if fd >= 0:
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.environ["LISTEN_FDS"] = "1"
for name in filter(None, sys.argv[2].split(",")):
    os.environ[name] = str(os.getpid())
os.execv(sys.executable, [sys.executable] + sys.argv[3:])
"""


def unit_settings(path):
    """A unit file as [(section, key, value)], in file order (keys may repeat)."""
    out, section = [], None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            out.append((section, key.strip(), value.strip()))
    return out


def unit_value(path, key):
    values = [v for _, k, v in unit_settings(path) if k == key]
    assert len(values) == 1, (path, key, values)
    return values[0]


def load_toml(path):
    import tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)


####################################################################################################
#  The shipped files
####################################################################################################

class UnitFileTests(unittest.TestCase):
    """systemd/: the units verify, and every file agrees with the others and with the daemon."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="jr-units-")
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name

    def copy_units(self, extra_service_line=None):
        """The units with ExecStart= pointing at this checkout (the shipped path,
        /usr/local/bin/jobrunnerd, exists only once installed, and verify checks it)."""
        with open(SERVICE) as f:
            service = f.read()
        self.assertEqual(service.count("ExecStart=" + SHIPPED_EXEC_START + "\n"), 1)
        service = service.replace("ExecStart=/usr/local/bin/jobrunnerd ", "ExecStart=%s %s "
                                  % (sys.executable, os.path.realpath(DAEMON)))
        if extra_service_line:
            service = service.replace("[Service]\n", "[Service]\n%s\n" % extra_service_line)
        paths = [os.path.join(self.tmp, "jobrunnerd.socket"),
                 os.path.join(self.tmp, "jobrunnerd.service")]
        shutil.copyfile(SOCKET_UNIT, paths[0])
        with open(paths[1], "w") as f:
            f.write(service)
        return paths

    def verify(self, paths):
        tool = shutil.which("systemd-analyze")
        if tool is None:
            self.skipTest("systemd-analyze is not installed (package systemd): "
                          "the unit files were not verified")
        run = subprocess.run([tool, "verify", "--man=no", *paths], capture_output=True,
                             text=True, timeout=60, cwd=self.tmp,
                             env=daemon_env(SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER=""))
        return run, (run.stdout + run.stderr).splitlines()

    def test_systemd_analyze_verify_prints_no_warnings(self):
        run, lines = self.verify(self.copy_units())
        # User=, Group=, SocketUser= and SocketGroup= are resolved when the unit starts, and the
        # accounts exist only once jobrunner.sysusers is installed. Some systemd versions' verify
        # mention an account that is missing on this machine: that, and only that, is expected.
        missing = [name for name in ("jobrunner", "jobrunner-clients") if not _account_exists(name)]
        if missing:
            about_account = re.compile(r"\b(user|group)\b.*\b(%s)\b|\b(%s)\b.*\b(user|group)\b"
                                       % ("|".join(missing), "|".join(missing)), re.I)
            lines = [line for line in lines if not about_account.search(line)]
        self.assertEqual(lines, [], "systemd-analyze verify complained")
        self.assertEqual(run.returncode, 0)

    def test_systemd_analyze_verify_does_read_our_units(self):
        """The check above is not vacuous: a bad line in the same files is reported."""
        run, lines = self.verify(self.copy_units("NoSuchSetting=1"))
        self.assertTrue(any("NoSuchSetting" in line for line in lines), lines)

    def test_service_settings_the_issue_asks_for(self):
        settings = {k: v for _, k, v in unit_settings(SERVICE)}
        self.assertEqual(settings["ExecStart"], SHIPPED_EXEC_START)
        expected = {
            "Type": "notify", "NotifyAccess": "main", "ExecReload": "/bin/kill -HUP $MAINPID",
            "Restart": "on-failure", "KillMode": "mixed", "User": "jobrunner",
            "Group": "jobrunner", "StateDirectory": "jobrunner", "LogsDirectory": "jobrunner",
            "RuntimeDirectory": "jobrunner", "UMask": "0077", "NoNewPrivileges": "yes",
            "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
            "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
            "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
            "ProtectControlGroups": "yes", "RestrictAddressFamilies": "AF_UNIX",
            "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
            "SystemCallArchitectures": "native"}
        self.assertEqual({k: settings.get(k) for k in expected}, expected)
        for key in ("StateDirectoryMode", "LogsDirectoryMode", "RuntimeDirectoryMode",
                    "WatchdogSec"):
            self.assertIn(key, settings)
        with open(SERVICE) as f:
            self.assertRegex(f.read(), r"#.*AF_INET AF_INET6", "how to let jobs use the network")

    def test_stop_timeout_outlasts_the_graceful_stop(self):
        import jobrunnerd
        config = load_toml(EXAMPLE_CONFIG)
        graces = [config.get(key, jobrunnerd.CONFIG_KEYS[key][0])
                  for key in ("shutdown_grace", "kill_grace")]
        self.assertGreater(_seconds(unit_value(SERVICE, "TimeoutStopSec")), sum(graces))
        self.assertGreaterEqual(_seconds(unit_value(SERVICE, "WatchdogSec")), 2)

    def test_paths_and_accounts_agree(self):
        """The socket unit, the config, jobctl's default and the service's directories name the
        same places; the sysusers file creates the accounts the units use."""
        import jobctl
        config = load_toml(EXAMPLE_CONFIG)
        listen = unit_value(SOCKET_UNIT, "ListenStream")
        self.assertEqual(listen, "/run/jobrunner/jobrunnerd.sock")
        self.assertEqual(config["socket"], listen)
        with open(jobctl.__file__) as f:
            self.assertIn('"%s"' % listen, f.read(), "jobctl's last-resort default")
        self.assertEqual(os.path.dirname(listen),
                         "/run/" + unit_value(SERVICE, "RuntimeDirectory"))
        self.assertEqual(config["state_dir"], "/var/lib/" + unit_value(SERVICE, "StateDirectory"))
        self.assertEqual(config["log_dir"], "/var/log/" + unit_value(SERVICE, "LogsDirectory"))
        self.assertEqual(unit_value(SOCKET_UNIT, "SocketMode"), "0660")
        with open(os.path.join(SYSTEMD_DIR, "jobrunner.sysusers")) as f:
            entries = [line.split() for line in f if line.strip() and not line.startswith("#")]
        users = {e[1] for e in entries if e[0] == "u"}
        groups = {e[1] for e in entries if e[0] in ("u", "g")}
        self.assertIn(unit_value(SERVICE, "User"), users)
        self.assertIn(unit_value(SERVICE, "Group"), groups)
        self.assertIn(unit_value(SOCKET_UNIT, "SocketUser"), users)
        self.assertEqual(unit_value(SOCKET_UNIT, "SocketGroup"), "jobrunner-clients")
        self.assertIn("jobrunner-clients", groups)
        with open(os.path.join(SYSTEMD_DIR, "jobrunner.tmpfiles")) as f:
            entries = [line.split() for line in f if line.strip() and not line.startswith("#")]
        self.assertIn(["d", os.path.dirname(listen), unit_value(SERVICE, "RuntimeDirectoryMode"),
                       "jobrunner", "jobrunner", "-"], entries)

    def test_example_config_has_every_key_and_loads(self):
        import jobrunnerd
        with open(EXAMPLE_CONFIG) as f:
            text = f.read()
        mentioned = set(re.findall(r"^(?:# )?([a-z_]+) = ", text, re.M))
        self.assertEqual(mentioned, set(jobrunnerd.CONFIG_KEYS))
        uncommented = re.sub(r"^# ([a-z_]+ = )", r"\1", text, flags=re.M)
        for name, body in (("as-shipped.toml", text), ("all-uncommented.toml", uncommented)):
            path = os.path.join(self.tmp, name)
            with open(path, "w") as f:
                f.write(body)
            run = subprocess.run([sys.executable, DAEMON, "--check-config", "--config", path],
                                 capture_output=True, text=True, timeout=30)
            self.assertEqual(run.returncode, 0, name + ": " + run.stderr)


def _account_exists(name):
    import grp
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        pass
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _seconds(value):
    """A systemd time span as used here: "60", "60s", "1min", "1min 30s"."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


####################################################################################################
#  A stand-in for systemd's notification socket, and a daemon started with it
####################################################################################################

class Notifications:
    """An AF_UNIX datagram socket like systemd's $NOTIFY_SOCKET: bound in `root`, or with an
    abstract name ("@..."). A thread reads every message as it arrives, as systemd does (a
    datagram queue holds only ~10 unread messages before the sender blocks), and keeps it as
    (arrival time, {field: value})."""

    def __init__(self, root=None, abstract=False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = "jobrunner-test-%d-%s" % (os.getpid(), secrets.token_hex(8))
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = os.path.join(root, "notify.sock")
            self.sock.bind(self.address)
        self.seen = []                  # every message received so far
        self.arrived = queue.Queue()    # those receive() has not returned yet
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return                  # closed
            if not data:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            entry = (time.monotonic(), fields)
            self.seen.append(entry)
            self.arrived.put(entry)

    def receive(self, timeout):
        """The next message, or None when `timeout` seconds pass without one."""
        try:
            return self.arrived.get(timeout=max(timeout, 0.001))
        except queue.Empty:
            return None

    def gather(self, seconds):
        """Every message that arrives within `seconds` from now."""
        deadline = time.monotonic() + seconds
        out = []
        while (left := deadline - time.monotonic()) > 0:
            entry = self.receive(left)
            if entry:
                out.append(entry)
        return out

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)    # wakes the reader's recv()
        self.sock.close()
        self.reader.join(5)


class NotifyNeverBlocksTest(unittest.TestCase):
    """sd_notify() on a notify socket nobody reads (its queue full) returns at once: a ping is
    dropped silently, any other message with a warning. It used to block the loop for ever."""

    def test_a_full_notify_socket_does_not_stop_the_caller(self):
        import jobrunnerd
        tmp = tempfile.TemporaryDirectory(prefix="jr-sdn-")
        self.addCleanup(tmp.cleanup)
        path = os.path.join(tmp.name, "notify.sock")
        deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        deaf.bind(path)                                 # never read
        said = []
        sent = threading.Event()

        def send():
            for _ in range(100):                        # the queue holds ~10 (net.unix)
                jobrunnerd.sd_notify("WATCHDOG=1")
            jobrunnerd.sd_notify("STATUS=busy")
            sent.set()
        with mock.patch.dict(os.environ, {"NOTIFY_SOCKET": path}), \
                mock.patch.object(jobrunnerd, "say", said.append):
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            finished = sent.wait(10)
            deaf.close()                # a sender still blocked now fails and returns
            sender.join(10)
        self.assertTrue(finished, "sd_notify blocked on a full notify socket")
        err = "\n".join(said)
        self.assertNotIn("WATCHDOG", err)
        self.assertIn("dropped 'STATUS=busy'", err)


def pings(entries):
    return [t for t, fields in entries if fields.get("WATCHDOG") == "1"]


def gaps(times):
    return [b - a for a, b in zip(times, times[1:])]


class SystemdCase(unittest.TestCase):
    """A daemon in a fresh temp dir, started by each test with the environment it needs."""

    config: dict = {}

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="jr-sd-")
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name
        os.makedirs(os.path.join(self.root, "jobs"))
        self.daemon = Daemon(self.root, **self.config)
        self.notes = []
        self.addCleanup(self.stop_daemon)

    def stop_daemon(self):
        d = self.daemon
        if d.proc is not None:
            terminate(d.proc, 30)
            d.stderr.close()
        for note in self.notes:         # after the daemon: its STOPPING=1 still has a receiver
            note.close()

    def notifications(self, abstract=False):
        note = Notifications(self.root, abstract)
        self.notes.append(note)
        return note

    def start(self, note=None, **env):
        if note is not None:
            env["NOTIFY_SOCKET"] = note.address
        self.daemon.start(wait=False, env=daemon_env(**env))

    def launch(self, argv, env, pass_fds=()):
        """Start `argv` as the daemon's process (a launcher that execs jobrunnerd)."""
        d = self.daemon
        d.write_config()
        d.stderr = open(d.stderr_path, "ab")
        d.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=d.stderr,
                                  stderr=d.stderr, env=env, pass_fds=pass_fds)

    def launcher(self, fd=-1, pid_vars=()):
        return [sys.executable, "-c", LAUNCHER, str(fd), ",".join(pid_vars),
                DAEMON, "--config", self.daemon.config_path]

    def expect(self, note, field, value=None, timeout=15.0):
        """Receive until a message carries `field` (equal to `value` if given); fail after
        `timeout` or as soon as the daemon has exited."""
        deadline = time.monotonic() + timeout
        while True:
            entry = note.receive(min(0.2, max(deadline - time.monotonic(), 0)))
            if entry and field in entry[1] and value in (None, entry[1][field]):
                return entry
            if entry is None and self.daemon.proc.poll() is not None:
                raise AssertionError("the daemon exited (%s) before %s=%s: %s" % (
                    self.daemon.proc.returncode, field, value or "", self.daemon.read_stderr()))
            if time.monotonic() > deadline:
                raise AssertionError("no %s=%s within %.0fs; received %r" % (
                    field, value or "", timeout, [f for _, f in note.seen]))

    def env_of_job(self, name):
        """What examples.jobs:env sees for variable `name` in a job process."""
        with self.daemon.raw() as c:
            reply = c.call(op="add", target="examples.jobs:env", args=[name])
            self.assertTrue(reply["ok"], reply)
            reply = c.call(op="wait", id=reply["id"], timeout=30)
        self.assertTrue(reply["ok"] and reply["done"], reply)
        self.assertEqual(reply["job"]["state"], "succeeded", reply)
        return reply["job"]["result"]

    def sigterm_and_wait(self):
        self.daemon.proc.send_signal(signal.SIGTERM)
        return self.daemon.proc.wait(30)


STATUS_RE = r"\A\d+ running, \d+ pending, \d+ failed(, paused)?\Z"


####################################################################################################
#  Readiness, status, reload, stop
####################################################################################################

class ReadinessTests(SystemdCase):
    config = {"shutdown_grace": 30, "kill_grace": 0.5}

    def test_ready_comes_once_the_state_is_loaded_and_the_socket_answers(self):
        self.start()                            # a first run leaves three jobs on disk
        self.daemon.wait_ready()
        for _ in range(3):
            self.daemon.add(delay=3600)
        self.assertEqual(self.sigterm_and_wait(), 0)
        self.daemon.stderr.close()

        note = self.notifications()
        self.start(note)
        _, ready = self.expect(note, "READY", "1")
        # At this moment, one connection attempt, no retry: the socket answers.
        with Raw(self.daemon.socket, timeout=5) as c:
            self.assertEqual(c.call(op="hello")["protocol"], 1)
        self.assertEqual(ready["STATUS"], "0 running, 3 pending, 0 failed", "the loaded state")
        self.assertEqual([f for _, f in note.seen if "READY" in f], [ready], "READY=1 once")

    def test_status_follows_changes_at_a_modest_rate(self):
        note = self.notifications()
        self.start(note)
        _, ready = self.expect(note, "READY", "1")
        self.assertRegex(ready["STATUS"], STATUS_RE)
        self.daemon.add(delay=3600)
        first, _ = self.expect(note, "STATUS", "0 running, 1 pending, 0 failed", timeout=10)
        self.daemon.add(delay=3600)
        second, _ = self.expect(note, "STATUS", "0 running, 2 pending, 0 failed", timeout=10)
        self.assertGreaterEqual(second - first, 1.5, "STATUS= is for people: at most every 2 s")
        self.daemon.call(op="pause")
        self.expect(note, "STATUS", "0 running, 2 pending, 0 failed, paused", timeout=10)

    def test_reloading_then_ready_around_sighup(self):
        note = self.notifications()
        self.start(note)
        self.expect(note, "READY", "1")
        self.daemon.proc.send_signal(signal.SIGHUP)
        reloading, _ = self.expect(note, "RELOADING", "1")
        ready, _ = self.expect(note, "READY", "1")
        self.assertLessEqual(reloading, ready)
        self.assertTrue(self.daemon.call(op="hello")["ok"])

    def test_stopping_when_the_stop_begins(self):
        note = self.notifications()
        self.start(note)
        self.expect(note, "READY", "1")
        job_id = self.daemon.add("examples.jobs:DelayedJob", args=[60])
        self.daemon.wait_state(job_id, "running")
        self.daemon.proc.send_signal(signal.SIGTERM)
        self.expect(note, "STOPPING", "1", timeout=10)
        # STOPPING=1 starts the stop: the attempt has shutdown_grace (30 s) left to run.
        self.assertEqual(self.daemon.get(job_id)["state"], "running")
        refused = self.daemon.call(op="add", target="examples.jobs:ExampleJob")
        self.assertEqual(refused["error"]["code"], "shutting_down")
        self.daemon.proc.send_signal(signal.SIGTERM)        # a second one: stop the jobs now
        self.assertEqual(self.daemon.proc.wait(30), 0)

    def test_abstract_notify_socket(self):
        note = self.notifications(abstract=True)
        self.start(note)
        self.expect(note, "READY", "1")
        self.assertTrue(self.daemon.call(op="hello")["ok"])
        self.daemon.proc.send_signal(signal.SIGTERM)
        self.expect(note, "STOPPING", "1")
        self.assertEqual(self.daemon.proc.wait(30), 0)

    def test_no_notify_variable_reaches_a_job(self):
        note = self.notifications()
        self.start(note, WATCHDOG_USEC=WATCHDOG_USEC, JOBRUNNER_SD_TEST_MARK="kept")
        self.expect(note, "READY", "1")
        self.assertEqual(self.env_of_job("JOBRUNNER_SD_TEST_MARK"), "kept")
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC"):
            self.assertIsNone(self.env_of_job(name), name)


####################################################################################################
#  The watchdog
####################################################################################################

class WatchdogTests(SystemdCase):

    def test_pings_every_half_the_watchdog_interval(self):
        note = self.notifications()
        # 1 s here: room for a loaded machine's scheduling delays inside the bounds.
        self.start(note, WATCHDOG_USEC="1000000")
        self.expect(note, "READY", "1")
        times = pings(note.gather(3.0))
        self.assertGreaterEqual(len(times), 5, times)
        mean = (times[-1] - times[0]) / (len(times) - 1)
        self.assertLess(mean, 0.65, "WATCHDOG_USEC/2 = 0.5 s on average")
        self.assertGreater(mean, 0.4, "not more often than WATCHDOG_USEC/2 either")
        self.assertLess(max(gaps(times)), 1.0, "systemd's deadline is WATCHDOG_USEC: %r"
                        % gaps(times))

    def test_a_stalled_loop_stops_the_pings_and_they_resume(self):
        note = self.notifications()
        self.start(note, WATCHDOG_USEC=WATCHDOG_USEC)
        self.expect(note, "READY", "1")
        before = [self.expect(note, "WATCHDOG", "1")[0] for _ in range(2)]
        sent = time.monotonic()
        self.daemon.proc.send_signal(signal.SIGSTOP)      # the loop stands still for 1.5 s
        resume = threading.Timer(1.5, self.daemon.proc.send_signal, (signal.SIGCONT,))
        resume.start()
        self.addCleanup(resume.join)
        times = before[-1:]
        deadline = sent + 6.0
        while time.monotonic() < deadline:
            entry = note.receive(deadline - time.monotonic())
            if entry and entry[1].get("WATCHDOG") == "1":
                times.append(entry[0])
                stall = max(gaps(times))
                if stall >= 1.0 and len(times) - 1 - gaps(times).index(stall) >= 3:
                    break
        spaced = gaps(times)
        stall = max(spaced)
        self.assertGreaterEqual(stall, 1.0, "no ping while the loop is stuck: %r" % spaced)
        after = spaced[spaced.index(stall) + 1:]
        self.assertGreaterEqual(len(after), 2, "pings resume after the stall: %r" % spaced)
        # Every 0.2 s again; the bounds leave room for a loaded machine's scheduling delays.
        self.assertLess(sorted(after)[len(after) // 2], 0.3, spaced)
        self.assertLess(max(after), 0.8, spaced)
        self.assertTrue(self.daemon.call(op="hello")["ok"])

    def test_no_pings_when_watchdog_pid_is_another_process(self):
        note = self.notifications()
        self.start(note, WATCHDOG_USEC=WATCHDOG_USEC, WATCHDOG_PID=str(os.getpid()))
        self.expect(note, "READY", "1")
        self.assertEqual(pings(note.gather(1.0)), [], "the watchdog is another process's")

    def test_pings_when_watchdog_pid_is_the_daemon(self):
        note = self.notifications()
        self.launch(self.launcher(pid_vars=["WATCHDOG_PID"]),
                    daemon_env(NOTIFY_SOCKET=note.address, WATCHDOG_USEC=WATCHDOG_USEC))
        self.expect(note, "READY", "1")
        self.assertGreaterEqual(len(pings(note.gather(1.0))), 3)


####################################################################################################
#  Socket activation
####################################################################################################

class SocketActivationTests(SystemdCase):

    def bind_listener(self, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(path)
        sock.listen(16)
        return sock

    def test_systemd_socket_activate(self):
        tool = shutil.which("systemd-socket-activate")
        if tool is None:
            self.skipTest("systemd-socket-activate is not installed (package systemd)")
        sock = self.daemon.socket               # the config's `socket` agrees with -l
        note = self.notifications()
        self.launch([tool, "-l", sock, "-E", "NOTIFY_SOCKET=" + note.address,
                     "-E", "WATCHDOG_USEC=" + WATCHDOG_USEC, "-E", "JOBRUNNER_SD_TEST_MARK=kept",
                     sys.executable, DAEMON, "--config", self.daemon.config_path], daemon_env())
        wait_until(lambda: os.path.exists(sock), message="systemd-socket-activate to bind")
        inode = os.stat(sock).st_ino
        # Without --accept, the activator execs the daemon on the first connection; had the
        # daemon ignored fd 3, it would find a live socket at its path and exit.
        conn = wait_until(lambda: _connect(sock), message="the activator to listen")
        with conn:
            self.assertEqual(conn.call(op="hello")["protocol"], 1)
        self.expect(note, "READY", "1")
        self.assertEqual(self.env_of_job("JOBRUNNER_SD_TEST_MARK"), "kept")
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                     "WATCHDOG_USEC"):
            self.assertIsNone(self.env_of_job(name), name + " reached a job")
        self.assertEqual(self.sigterm_and_wait(), 0)
        self.assertTrue(stat.S_ISSOCK(os.lstat(sock).st_mode), "systemd's socket file stays")
        self.assertEqual(os.stat(sock).st_ino, inode)

    def test_listening_socket_on_fd_3(self):
        """A socket bound by someone else (systemd) on fd 3, at the config's path: the daemon
        serves on it (had it ignored fd 3, it would have found a live socket there and exited),
        and at exit leaves the file alone."""
        path = self.daemon.socket
        listener = self.bind_listener(path)
        inode = os.stat(path).st_ino
        self.launch(self.launcher(listener.fileno(), pid_vars=["LISTEN_PID"]), daemon_env(),
                    pass_fds=(listener.fileno(),))
        self.daemon.wait_ready()
        for name in ("LISTEN_PID", "LISTEN_FDS"):
            self.assertIsNone(self.env_of_job(name), name + " reached a job")
        self.assertEqual(self.sigterm_and_wait(), 0)
        self.assertTrue(stat.S_ISSOCK(os.lstat(path).st_mode), "the passed socket's file stays")
        self.assertEqual(os.stat(path).st_ino, inode, "and is not replaced")

    def test_fds_meant_for_another_process_are_ignored(self):
        """LISTEN_PID names someone else (the fds were not meant for us): bind the config's
        socket as usual, and remove it at exit."""
        path = os.path.join(self.root, "activated.sock")
        listener = self.bind_listener(path)
        self.launch(self.launcher(listener.fileno()), daemon_env(LISTEN_PID="1"),
                    pass_fds=(listener.fileno(),))
        self.daemon.wait_ready()
        self.assertIsNone(self.env_of_job("LISTEN_FDS"))
        self.assertEqual(self.sigterm_and_wait(), 0)
        self.assertFalse(os.path.lexists(self.daemon.socket), "its own socket is removed")
        self.assertTrue(os.path.lexists(path))


def _connect(path):
    try:
        return Raw(path, timeout=20)
    except OSError:
        return None


####################################################################################################
#  SIGHUP: logrotate, allow and limits
####################################################################################################

HUP_JOBS = '''
import resource

def hello():
    return "hello"

def nofile():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
'''


class ReloadTests(SystemdCase):

    def setUp(self):
        super().setUp()
        with open(os.path.join(self.root, "jobs", "hupjobs.py"), "w") as f:
            f.write(HUP_JOBS)
        self.note = self.notifications()

    def log_path(self, name="background_jobs.log"):
        return os.path.join(self.daemon.log_dir, name)

    def read(self, path):
        with open(path, encoding="utf-8") as f:
            return f.read()

    def run_job(self, target, **fields):
        return self.daemon.wait_job(self.daemon.add(target, **fields))

    def reload(self):
        self.daemon.proc.send_signal(signal.SIGHUP)
        self.expect(self.note, "RELOADING", "1")
        self.expect(self.note, "READY", "1")

    def rewrite_config(self, text=None, **changes):
        self.daemon.config.update(changes)
        if text is None:
            self.daemon.write_config()
        else:
            with open(self.daemon.config_path, "w") as f:
                f.write(text)

    def test_sighup_after_the_logs_were_moved(self):
        self.start(self.note)
        self.expect(self.note, "READY", "1")
        self.assertEqual(self.run_job("examples.jobs:ExampleJob")["state"], "succeeded")
        self.assertEqual(self.run_job("examples.jobs:ErrorJob")["state"], "failed")
        moved = {}
        for name in ("background_jobs.log", "background_jobs_errors.log"):
            os.rename(self.log_path(name), self.log_path(name + ".1"))
            moved[name] = self.read(self.log_path(name + ".1"))
        self.assertIn("job=2 ", moved["background_jobs_errors.log"])
        self.reload()
        self.assertEqual(self.run_job("examples.jobs:ExampleJob")["state"], "succeeded")
        self.assertEqual(self.run_job("examples.jobs:ErrorJob")["state"], "failed")
        events = self.read(self.log_path())
        self.assertRegex(events, r"event=succeeded job=3 ")
        self.assertRegex(events, r"event=failed job=4 ")
        self.assertNotIn("job=1 ", events)
        self.assertRegex(self.read(self.log_path("background_jobs_errors.log")),
                         r"\A\S+ event=failed job=4 ")
        for name, text in moved.items():
            self.assertEqual(self.read(self.log_path(name + ".1")), text,
                             name + " kept growing after SIGHUP")

    def test_shipped_logrotate_stanza(self):
        tool = shutil.which("logrotate")
        if tool is None:
            self.skipTest("logrotate is not installed: systemd/jobrunnerd.logrotate not run")
        self.start(self.note)
        self.expect(self.note, "READY", "1")
        self.run_job("examples.jobs:ExampleJob")
        with open(os.path.join(SYSTEMD_DIR, "jobrunnerd.logrotate")) as f:
            stanza = f.read()
        for shipped in ("/var/log/jobrunner/", "systemctl reload jobrunnerd.service"):
            self.assertIn(shipped, stanza)
        stanza = stanza.replace("/var/log/jobrunner/", self.daemon.log_dir + "/").replace(
            "systemctl reload jobrunnerd.service", "kill -HUP %d" % self.daemon.proc.pid)
        conf = os.path.join(self.root, "logrotate.conf")
        with open(conf, "w") as f:
            f.write(stanza)
        os.chmod(conf, 0o644)
        run = subprocess.run([tool, "--force", "--state", os.path.join(self.root, "lr.state"),
                              conf], capture_output=True, text=True, timeout=30)
        self.assertEqual(run.returncode, 0, run.stderr)
        self.expect(self.note, "RELOADING", "1")
        self.expect(self.note, "READY", "1")
        self.run_job("examples.jobs:ExampleJob")
        self.assertRegex(self.read(self.log_path("background_jobs.log.1")), r"job=1 ")
        new = self.read(self.log_path())
        self.assertRegex(new, r"event=succeeded job=2 ")
        self.assertNotIn("job=1 ", new)

    def test_allow_list_and_limits_reload(self):
        self.start(self.note)
        self.expect(self.note, "READY", "1")
        refused = self.daemon.call(op="add", target="hupjobs:hello")
        self.assertEqual(refused["error"]["code"], "not_allowed")
        self.rewrite_config(allow=["examples.*:*", "hupjobs:*"], limits={"nofile": 77})
        self.reload()
        self.assertEqual(self.run_job("hupjobs:hello")["result"], "hello")
        self.assertEqual(self.run_job("hupjobs:nofile")["result"], 77)

    def test_a_broken_config_on_reload_keeps_the_old_one(self):
        self.daemon.config["allow"] = ["examples.*:*", "hupjobs:*"]
        self.start(self.note)
        self.expect(self.note, "READY", "1")
        good = self.read(self.daemon.config_path)
        for broken, why in (("allow = [\n", "not TOML"),
                            (good + "allow_more = 1\n", "an unknown key"),
                            (good.replace('allow = ["examples.*:*", "hupjobs:*"]',
                                          "allow = 5"), "a bad value")):
            with self.subTest(why):
                with open(self.daemon.config_path, "w") as f:
                    f.write(broken)
                before = len(self.daemon.read_stderr())
                self.reload()
                self.assertIsNone(self.daemon.proc.poll())
                said = self.daemon.read_stderr()[before:]
                self.assertRegex(said, r"reload: .*; keeping the old config")
                self.assertEqual(self.run_job("hupjobs:hello")["state"], "succeeded")
                refused = self.daemon.call(op="add", target="os:system", args=["true"])
                self.assertEqual(refused["error"]["code"], "not_allowed")


if __name__ == "__main__":
    unittest.main()
