"""jobctl top: a live view of one jobrunner daemon (SPEC §4), loaded only when `top` runs.

jobctl.py imports this module inside cmd_top() alone, so `jobctl add` and every other command
never pay for it, nor for curses. One frame is four questions to the daemon, each answered
from counters and indexes (never a walk of the job table, also at 1M jobs): `stats` (uptime,
the whole-daemon pause), `queues` (slots, pause, counts per state), `activity` (running jobs,
latest failed attempts, jobs finished over the last minute) and `schedules` (next fires; a
daemon without that op answers unknown_op, and the panel says so).

    gather(client) -> dict          the four replies as one snapshot
    frame(snap, now) -> [(text, style)]   the lines of one frame, styles by name
    plain(lines, colour) -> str     a frame as text (ANSI colours only if asked)
    run(client, ns) -> int          --once (or --json): one frame; else the curses loop

The live view is curses: it redraws the whole frame each interval and on a resize
(KEY_RESIZE), cuts lines to the window, and quits on `q` or Ctrl-C. Colours only on a
terminal and never with NO_COLOR set.
"""
from __future__ import annotations

import os
import sys
import time

import jobctl

STATES = ("blocked", "pending", "running", "succeeded", "failed", "cancelled")
MIN_INTERVAL = 0.1          # s: a smaller --interval would only load the daemon
SHOWN_RUNNING = 20          # rows of running jobs (the panel says how many more)
SHOWN_FAILURES = 10         # rows of the latest failed attempts
SHOWN_SCHEDULES = 10        # rows of next schedule fires
ANSI = {"title": "1", "head": "1", "bad": "31", "warn": "33", "good": "32", "dim": "2"}


def gather(client: jobctl.Client) -> dict:
    """One snapshot of the daemon: stats, queues, activity and schedules (None with the
    reason when the daemon has no `schedules` op)."""
    snap = {"stats": client.stats(), "queues": client.queues(), "activity": client.activity()}
    try:
        snap["schedules"] = client.call("schedules").get("schedules")
        snap["schedules_error"] = None
    except jobctl.JobrunnerError as e:
        if isinstance(e, jobctl.DaemonUnreachable):
            raise
        snap["schedules"], snap["schedules_error"] = None, e.code
    return snap


def _table(rows: list[tuple], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def frame(snap: dict, now: float | None = None) -> list[tuple[str, str | None]]:
    """The lines of one frame, each (text, style name or None). Every string that came from
    a user or a job goes through jobctl.escape()."""
    esc = jobctl.escape
    now = time.time() if now is None else now
    stats, act = snap["stats"], snap["activity"]
    out: list[tuple[str, str | None]] = []
    title = "jobrunner top  %s  up %s  finished %.2f/s (last minute: %s)" % (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
        jobctl.duration(float(stats.get("uptime") or 0)),
        float(act.get("finished_per_second") or 0), act.get("finished_last_minute", 0))
    if stats.get("paused"):
        title += "  PAUSED (whole daemon)"
    out.append((title, "title"))
    out.append(("", None))
    rows = [("QUEUE", "SLOTS", "PAUSED", *(s.upper() for s in STATES))]
    styles: list[str | None] = ["head"]
    for q in snap["queues"]:
        counts = q.get("counts") if isinstance(q.get("counts"), dict) else {}
        paused = "yes" if q.get("paused") else "no"
        if q.get("declared") is False:
            paused += " (undeclared)"
        rows.append((esc(str(q.get("name"))), "%s/%s" % (q.get("running"), q.get("workers")),
                     paused, *(str(counts.get(s, 0)) for s in STATES)))
        styles.append("warn" if q.get("paused") else "bad" if counts.get("failed") else None)
    out += list(zip(_table(rows, set(range(3, 3 + len(STATES)))), styles))
    out.append(("", None))
    running, total = act.get("running", []), act.get("running_total", 0)
    shown = running[:SHOWN_RUNNING]
    out.append(("RUNNING (%d)" % total + ("  %d more not shown" % (total - len(shown))
                                          if total > len(shown) else ""), "head"))
    if shown:
        rows = [("ID", "QUEUE", "ELAPSED", "TARGET")]
        for j in shown:
            target = str(j.get("target"))
            if j.get("method"):
                target += "." + str(j["method"])
            started = j.get("started_at")
            elapsed = jobctl.duration(max(0.0, now - started)) if started else "-"
            rows.append((str(j.get("id")), esc(str(j.get("queue"))), elapsed, esc(target)))
        out += [(line, None) for line in _table(rows, {0, 2})]
    else:
        out.append(("  none", "dim"))
    out.append(("", None))
    failures = act.get("failures", [])[:SHOWN_FAILURES]
    out.append(("LATEST FAILURES", "head"))
    if failures:
        rows = [("ID", "WHEN", "QUEUE", "OUTCOME", "ERROR")]
        for f in failures:
            at = f.get("at")
            rows.append((str(f.get("id")), jobctl.relative_time(at, now) if at else "-",
                         esc(str(f.get("queue"))), str(f.get("outcome")),
                         esc(str(f.get("error") or ""))))
        out += [(line, "bad" if i else None) for i, line in enumerate(_table(rows, {0}))]
    else:
        out.append(("  none since the daemon started", "dim"))
    out.append(("", None))
    out.append(("NEXT SCHEDULE FIRES", "head"))
    schedules = snap.get("schedules")
    if schedules is None:
        out.append(("  not known: this daemon has no schedules (%s)"
                    % snap.get("schedules_error"), "dim"))
    else:
        fires = sorted((s for s in schedules if isinstance(s, dict)),
                       key=lambda s: (s.get("next_run_at") is None, s.get("next_run_at") or 0))
        if not fires:
            out.append(("  none declared", "dim"))
        else:
            rows = [("SCHEDULE", "NEXT FIRE")]
            for s in fires[:SHOWN_SCHEDULES]:
                at = s.get("next_run_at")
                when = "-" if at is None else jobctl.local_time(at, now)
                rows.append((esc(str(s.get("name"))), when + (" (paused)" if s.get("paused")
                                                               else "")))
            out += [(line, None) for line in _table(rows, set())]
    return out


def plain(lines: list[tuple[str, str | None]], colour: bool) -> str:
    """A frame as text; with `colour`, styled lines in ANSI colours."""
    if not colour:
        return "\n".join(text for text, _ in lines)
    return "\n".join("\x1b[%sm%s\x1b[0m" % (ANSI[style], text) if style else text
                     for text, style in lines)


def use_colour(stream) -> bool:
    """SPEC §4: colour only on a terminal, never with NO_COLOR set (to anything)."""
    return "NO_COLOR" not in os.environ and stream.isatty()


def run(client: jobctl.Client, ns) -> int:
    interval = max(MIN_INTERVAL, ns.interval)
    if ns.json:
        jobctl._out_json(gather(client))
        return jobctl.EXIT_OK
    if ns.once or not (sys.stdout.isatty() and sys.stdin.isatty()):
        jobctl._out(plain(frame(gather(client)), use_colour(sys.stdout)))
        return jobctl.EXIT_OK
    import curses
    try:
        return curses.wrapper(_live, client, interval)
    except KeyboardInterrupt:
        return jobctl.EXIT_OK


def _live(screen, client: jobctl.Client, interval: float) -> int:
    import curses
    colour = "NO_COLOR" not in os.environ and curses.has_colors()
    attrs = {"title": curses.A_BOLD, "head": curses.A_BOLD, "dim": curses.A_DIM}
    if colour:
        curses.use_default_colors()
        for n, (style, fg) in enumerate((("bad", curses.COLOR_RED),
                                         ("warn", curses.COLOR_YELLOW),
                                         ("good", curses.COLOR_GREEN)), start=1):
            curses.init_pair(n, fg, -1)
            attrs[style] = curses.color_pair(n)
    try:
        curses.curs_set(0)
    except curses.error:
        pass                            # a terminal that cannot hide the cursor
    screen.timeout(int(interval * 1000))
    lines: list[tuple[str, str | None]] = []
    fetched = 0.0
    while True:
        if time.monotonic() - fetched >= interval:
            fetched = time.monotonic()
            try:
                lines = frame(gather(client))
            except jobctl.DaemonUnreachable as e:   # shown, and asked again next interval
                lines = [("jobrunner top: %s" % jobctl.escape(e.message), "bad"),
                         ("  trying again every %gs; q quits" % interval, "dim")]
                client.close()
        height, width = screen.getmaxyx()
        screen.erase()
        for y, (text, style) in enumerate(lines[:max(0, height - 1)]):
            try:
                screen.addnstr(y, 0, text, max(0, width - 1), attrs.get(style, 0))
            except curses.error:
                pass                    # the window shrank meanwhile: the next draw fits
        try:
            screen.addnstr(height - 1, 0, "q quits, refreshed every %gs" % interval,
                           max(0, width - 1), curses.A_DIM)
        except curses.error:
            pass
        screen.refresh()
        key = screen.getch()            # waits up to the interval; a resize wakes it
        if key in (ord("q"), ord("Q")):
            return jobctl.EXIT_OK
        if key == curses.KEY_RESIZE:
            curses.update_lines_cols()
