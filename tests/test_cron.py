"""Cron expressions, fire times and [schedules.NAME] tables (SPEC §2c, §5 --check-config).

The parser and next_fire() are pure, so most of this steps them directly: a table of
expressions with their next fire times worked out by hand (leap years, month ends, both day
fields restricted, names, 7 = Sunday, steps, macros), the DST rules in Europe/Berlin and
America/New_York, `every`, a randomised cross-check against a brute-force minute-by-minute
reference, speed, each config error, and --check-config through the real command line.

The DST tests need the tz database (zoneinfo reads /usr/share/zoneinfo, or the tzdata package):
without a zone they are skipped with a message saying so, never passed silently.
"""
import datetime
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import zoneinfo
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jobrunnerd                                   # noqa: E402
from jobrunnerd import CronExpr, ConfigError        # noqa: E402
from tests import support                           # noqa: E402
from tests.support import DAEMON, toml_value        # noqa: E402

UTC = datetime.timezone.utc
ZONES = zoneinfo.available_timezones()


def zone(name):
    """The zone, or skip with a message: a DST test never passes without its zone."""
    if name not in ZONES:
        raise unittest.SkipTest("time zone %s is not installed (no tz database for zoneinfo: "
                                "install tzdata)" % name)
    return zoneinfo.ZoneInfo(name)


def ts(*fields, tz=UTC, fold=0):
    return datetime.datetime(*fields, tzinfo=tz, fold=fold).timestamp()


def local(t, tz):
    return datetime.datetime.fromtimestamp(t, tz)


def fires(expr, after, tz, count):
    cron = CronExpr(expr)
    out = []
    for _ in range(count):
        fire = cron.next_fire(after, tz)
        assert fire > after, "next_fire(%r) = %r is not after it" % (after, fire)
        out.append(fire)
        after = fire
    return out


####################################################################################################
#  Parsing
####################################################################################################

class ParseTest(unittest.TestCase):

    def test_fields_become_sets(self):
        e = CronExpr("5/20 1-23/2 1,15 jan-MAR Mon-Fri")
        self.assertEqual(e.minutes, {5, 25, 45})
        self.assertEqual(e.hours, set(range(1, 24, 2)))
        self.assertEqual(e.days, {1, 15})
        self.assertEqual(e.months, {1, 2, 3})
        self.assertEqual(e.weekdays, {1, 2, 3, 4, 5})
        self.assertEqual(e.day_rule, "either")

    def test_sunday_is_0_and_7(self):
        self.assertEqual(CronExpr("0 0 * * 7").weekdays, {0})
        self.assertEqual(CronExpr("0 0 * * 5-7").weekdays, {5, 6, 0})
        self.assertEqual(CronExpr("0 0 * * sun"), CronExpr("0 0 * * 0"))
        self.assertEqual(CronExpr("0 0 * * */2").weekdays, {0, 2, 4, 6})

    def test_macros(self):
        for macro, fields in (("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"),
                              ("@monthly", "0 0 1 * *"), ("@weekly", "0 0 * * 0"),
                              ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"),
                              ("@hourly", "0 * * * *"), ("@Daily", "0 0 * * *")):
            with self.subTest(macro=macro):
                self.assertEqual(CronExpr(macro), CronExpr(fields))

    def test_the_day_rule_looks_at_the_first_character(self):
        self.assertEqual(CronExpr("0 0 1 * 1").day_rule, "either")
        self.assertEqual(CronExpr("0 0 */2 * 1").day_rule, "both")     # as Vixie: starts with *
        self.assertEqual(CronExpr("0 0 1 * *").day_rule, "both")

    def test_errors_name_the_field(self):
        for text, message in (
                ("61 * * * *", "minute: 61 is out of 0-59"),
                ("* 24 * * *", "hour: 24 is out of 0-23"),
                ("* * 0 * *", "day-of-month: 0 is out of 1-31"),
                ("* * 32 * *", "day-of-month: 32 is out of 1-31"),
                ("* * * 13 *", "month: 13 is out of 1-12"),
                ("* * * * 8", "day-of-week: 8 is out of 0-7"),
                ("*/0 * * * *", "minute: step 0"),
                ("* 1-5/0 * * *", "hour: step 0"),
                ("1,,2 * * * *", "minute: empty item"),
                ("* * * * 1,", "day-of-week: empty item"),
                ("* * * *", "cron: 4 field(s)"),
                ("* * * * * *", "cron: 6 field(s)"),
                ("", "cron: 0 field(s)"),
                ("* * * foo *", "month: unknown name 'foo'"),
                ("* * * * funday", "day-of-week: unknown name 'funday'"),
                ("* * * jan *x", "day-of-week: '*x' is not a number"),
                ("@reboot", "cron: unknown macro '@reboot'"),
                ("5-1 * * * *", "minute: range '5-1' runs backwards"),
                ("1- * * * *", "minute: '1-' is not a value or a range"),
                ("*/x * * * *", "minute: step 'x' is not a whole number"),
                ("-1 * * * *", "minute: '-1' is not a value or a range"),
                ("0 0 31 2,4 *", "day-of-month: no day in '31' exists"),
                ("0 0 30 feb *", "day-of-month: no day in '30' exists"),
                ("\u0661 * * * *", "minute: '\u0661' is not a number")):
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as caught:
                    CronExpr(text)
                self.assertIn(message, str(caught.exception))
        with self.assertRaises(ValueError):
            CronExpr(5)

    def test_a_never_day_is_fine_when_the_weekday_can_match(self):
        CronExpr("0 0 31 2 mon")         # either rule: every Monday in February
        CronExpr("0 0 29 2 *")           # leap years


####################################################################################################
#  Next fire time: a table worked out by hand (UTC)
####################################################################################################

D = datetime.datetime
TABLE = (
    # expression, after (UTC), expected next fire (UTC)
    ("* * * * *", D(2026, 1, 1, 0, 0), D(2026, 1, 1, 0, 1)),
    ("* * * * *", D(2026, 1, 1, 0, 0, 30), D(2026, 1, 1, 0, 1)),
    ("* * * * *", D(2026, 12, 31, 23, 59, 59), D(2027, 1, 1, 0, 0)),
    ("0 0 29 2 *", D(2027, 1, 1), D(2028, 2, 29)),
    ("0 0 29 2 *", D(2027, 6, 1), D(2028, 2, 29)),
    ("0 0 29 2 *", D(2028, 2, 29), D(2032, 2, 29)),
    ("0 0 29 2 *", D(2096, 3, 1), D(2104, 2, 29)),               # 2100 is not a leap year
    ("0 0 29 2 *", D(1999, 1, 1), D(2000, 2, 29)),               # 2000 is one
    ("0 0 31 * *", D(2026, 1, 31), D(2026, 3, 31)),
    ("0 0 31 * *", D(2026, 4, 1), D(2026, 5, 31)),
    ("0 0 31 * *", D(2026, 7, 31), D(2026, 8, 31)),
    ("0 12 30 * *", D(2026, 1, 30, 12), D(2026, 3, 30, 12)),      # no Feb 30
    ("59 23 28-31 * *", D(2026, 2, 28, 23, 59), D(2026, 3, 28, 23, 59)),
    ("0 0 13 * fri", D(2026, 1, 1), D(2026, 1, 2)),               # either: Jan 2 is a Friday
    ("0 0 13 * fri", D(2026, 1, 10), D(2026, 1, 13)),             # either: Jan 13 is a Tuesday
    ("0 0 13 * *", D(2026, 1, 1), D(2026, 1, 13)),
    ("0 0 */10 * mon", D(2026, 1, 1), D(2026, 5, 11)),            # both: 1st/11th/21st/31st Mondays
    ("0 0 */10 * mon", D(2026, 5, 11), D(2026, 6, 1)),
    ("0 0 29 2 */7", D(2026, 1, 1), D(2032, 2, 29)),              # both: Feb 29, a Sunday
    ("0 0 29 2 */7", D(2032, 2, 29), D(2060, 2, 29)),
    ("0 0 29 2 */7", D(2088, 3, 1), D(2128, 2, 29)),
    ("0 0 13 1 */7", D(2019, 1, 14), D(2030, 1, 13)),             # 11 years apart
    ("0 9 * jan-mar mon-fri", D(2026, 3, 31, 9), D(2027, 1, 1, 9)),   # Jan 1 2027 is a Friday
    ("0 9 * JAN-Mar Mon-FRI", D(2026, 1, 2, 9), D(2026, 1, 5, 9)),    # Sat, Sun skipped
    ("0 9 * * SUN", D(2026, 1, 1), D(2026, 1, 4, 9)),
    ("0 9 * * 7", D(2026, 1, 1), D(2026, 1, 4, 9)),
    ("0 9 * * 0", D(2026, 1, 1), D(2026, 1, 4, 9)),
    ("0 0 * * 5-7", D(2026, 1, 4), D(2026, 1, 9)),                # Sun -> next Fri
    ("0 0 1 JAN *", D(2026, 1, 1), D(2027, 1, 1)),
    ("*/15 * * * *", D(2026, 1, 1, 0, 14, 59), D(2026, 1, 1, 0, 15)),
    ("*/15 * * * *", D(2026, 1, 1, 0, 45), D(2026, 1, 1, 1, 0)),
    ("5/20 * * * *", D(2026, 1, 1, 0, 45), D(2026, 1, 1, 1, 5)),
    ("10-30/10 * * * *", D(2026, 1, 1, 0, 30), D(2026, 1, 1, 1, 10)),
    ("0 */6 * * *", D(2026, 1, 1, 13), D(2026, 1, 1, 18)),
    ("0 1-23/2 * * *", D(2026, 1, 1, 23), D(2026, 1, 2, 1)),
    ("0,30 8,17 * * *", D(2026, 1, 1, 8, 30), D(2026, 1, 1, 17)),
    ("0,30 8,17 * * *", D(2026, 1, 1, 17, 30), D(2026, 1, 2, 8)),
    ("@yearly", D(2026, 6, 1), D(2027, 1, 1)),
    ("@annually", D(2026, 1, 1), D(2027, 1, 1)),
    ("@monthly", D(2026, 1, 31, 12), D(2026, 2, 1)),
    ("@weekly", D(2026, 1, 1), D(2026, 1, 4)),                    # Sunday midnight
    ("@daily", D(2026, 2, 28, 0, 0, 1), D(2026, 3, 1)),
    ("@midnight", D(2028, 2, 28, 1), D(2028, 2, 29)),
    ("@hourly", D(2026, 1, 1, 23, 0), D(2026, 1, 2, 0, 0)),
)


class TableTest(unittest.TestCase):

    def test_table(self):
        for expr, after, expected in TABLE:
            with self.subTest(expr=expr, after=after):
                got = CronExpr(expr).next_fire(after.replace(tzinfo=UTC).timestamp(), UTC)
                self.assertEqual(local(got, UTC).replace(tzinfo=None), expected)

    def test_leap_days_in_a_row(self):
        got = fires("0 0 29 2 *", ts(2027, 1, 1), UTC, 4)
        self.assertEqual([local(t, UTC).date() for t in got],
                         [datetime.date(y, 2, 29) for y in (2028, 2032, 2036, 2040)])

    def test_month_ends(self):
        got = fires("0 0 31 * *", ts(2026, 1, 1), UTC, 7)
        self.assertEqual([local(t, UTC).month for t in got], [1, 3, 5, 7, 8, 10, 12])

    def test_the_rarest_is_answered_too(self):
        started = time.perf_counter()
        got = CronExpr("0 0 29 2 */7").next_fire(ts(2088, 3, 1), UTC)
        self.assertEqual(got, ts(2128, 2, 29))
        self.assertLess(time.perf_counter() - started, 0.05)

    def test_a_rare_expression_is_answered_at_once(self):
        cron = CronExpr("0 0 29 2 *")
        after = ts(2028, 3, 1)
        runs = []
        for _ in range(200):
            started = time.perf_counter()
            cron.next_fire(after, UTC)
            runs.append(time.perf_counter() - started)
        runs.sort()
        # ~0.1 ms here; a minute-by-minute scan over four years would take seconds. The bound
        # leaves room for a loaded machine.
        self.assertLess(runs[len(runs) // 2], 0.002, "median %.3f ms" % (runs[100] * 1e3))
        berlin = zone("Europe/Berlin")
        started = time.perf_counter()
        for _ in range(100):
            CronExpr("0 0 29 2 *").next_fire(after, berlin)
        self.assertLess((time.perf_counter() - started) / 100, 0.005)


####################################################################################################
#  Daylight-saving time
####################################################################################################

class DstTest(unittest.TestCase):
    """Berlin 2026: 02:00 CET -> 03:00 CEST on Mar 29 (01:00 UTC), 03:00 CEST -> 02:00 CET on
    Oct 25 (01:00 UTC). New York 2026: 02:00 EST -> 03:00 EDT on Mar 8 (07:00 UTC), 02:00 EDT
    -> 01:00 EST on Nov 1 (06:00 UTC)."""

    def test_spring_gap_fires_once_at_the_gap_end(self):
        for name, day in (("Europe/Berlin", 29), ("America/New_York", 8)):
            with self.subTest(zone=name):
                tz = zone(name)
                got = fires("30 2 * * *", ts(2026, 3, day - 1, tz=tz), tz, 3)
                self.assertEqual([local(t, tz).strftime("%m-%d %H:%M") for t in got],
                                 ["03-%02d 02:30" % (day - 1), "03-%02d 03:00" % day,
                                  "03-%02d 02:30" % (day + 1)])
                # the gap day's fire is the transition itself: the offset changed just before
                self.assertNotEqual(local(got[1] - 1, tz).utcoffset(),
                                    local(got[1], tz).utcoffset())
                self.assertEqual(got[2] - got[1], 86400 - 1800)

    def test_spring_gap_berlin_in_utc(self):
        tz = zone("Europe/Berlin")
        self.assertEqual(fires("30 2 * * *", ts(2026, 3, 28, 12), tz, 2),
                         [ts(2026, 3, 29, 1, 0), ts(2026, 3, 30, 0, 30)])
        # every minute of the gap hour collapses into one fire at 03:00 CEST
        self.assertEqual(fires("* 2 * * *", ts(2026, 3, 29, 0, 58), tz, 2),
                         [ts(2026, 3, 29, 1, 0), ts(2026, 3, 30, 0, 0)])

    def test_autumn_repeat_fires_once_at_the_first(self):
        for name, day, expr, first_utc in (
                ("Europe/Berlin", (2026, 10, 25), "30 2 * * *", (2026, 10, 25, 0, 30)),
                ("America/New_York", (2026, 11, 1), "30 1 * * *", (2026, 11, 1, 5, 30))):
            with self.subTest(zone=name):
                tz = zone(name)
                got = fires(expr, ts(*day, tz=tz) - 3600, tz, 2)
                self.assertEqual(got[0], ts(*first_utc))
                self.assertEqual(got[1] - got[0], 86400 + 3600)    # next day, the day is 25 h
                # asked from inside the second occurrence, the next fire is tomorrow's
                second = ts(*first_utc) + 3600 - 60
                self.assertEqual(CronExpr(expr).next_fire(second, tz), got[1])

    def test_every_15_minutes_across_both_changes(self):
        for name, spring, autumn in (("Europe/Berlin", ts(2026, 3, 29, 1), ts(2026, 10, 25, 1)),
                                     ("America/New_York", ts(2026, 3, 8, 7), ts(2026, 11, 1, 6))):
            with self.subTest(zone=name):
                tz = zone(name)
                # spring: 01:45 local, then the gap's fires collapse into the one at 03:00
                got = fires("*/15 * * * *", spring - 3 * 3600, tz, 16)
                self.assertEqual(len(set(got)), len(got), "no doubles")
                gaps = [b - a for a, b in zip(got, got[1:])]
                self.assertEqual(gaps, [900] * 15, "one fire every 15 minutes of real time")
                walls = [local(t, tz).strftime("%H:%M") for t in got]
                self.assertNotIn("02:00", walls)
                self.assertIn("03:00", walls)
                # autumn: the repeated hour fires once, then 15 minutes are 75 of real time
                got = fires("*/15 * * * *", autumn - 3 * 3600, tz, 16)
                self.assertEqual(len(set(got)), len(got), "no doubles")
                walls = [local(t, tz).strftime("%H:%M") for t in got]
                self.assertEqual(len(walls), len(set(walls)), "no wall time fires twice")
                expected = []
                wall = local(got[0], tz).replace(tzinfo=None)
                for _ in range(16):
                    expected.append(wall.strftime("%H:%M"))
                    wall += datetime.timedelta(minutes=15)
                self.assertEqual(walls, expected, "no missing wall time")
                self.assertIn(3600 + 900, [b - a for a, b in zip(got, got[1:])])

    def test_instant_of_a_gap_time(self):
        tz = zone("Europe/Berlin")
        self.assertEqual(CronExpr.instant(D(2026, 3, 29, 2, 59), tz), ts(2026, 3, 29, 1))
        self.assertEqual(CronExpr.instant(D(2026, 10, 25, 2, 0), tz), ts(2026, 10, 25, 0))
        self.assertEqual(CronExpr.instant(D(2026, 10, 25, 3, 0), tz), ts(2026, 10, 25, 2))


####################################################################################################
#  Randomised cross-check against a brute-force reference
####################################################################################################

def reference_next(expr, after, tz):
    """Minute by minute in real time (skipping days and hours that cannot match): the first
    instant t > after whose local wall time matches at its first occurrence, or that ends a
    DST gap in which some skipped wall minute matches. Independent of next_wall()/instant()."""
    e = CronExpr(expr)
    fields = expr.split()
    either = not fields[2].startswith("*") and not fields[4].startswith("*")

    def day_ok(w):
        dom, dow = w.day in e.days, (w.weekday() + 1) % 7 in e.weekdays
        return w.month in e.months and ((dom or dow) if either else (dom and dow))

    def ok(w):
        return day_ok(w) and w.hour in e.hours and w.minute in e.minutes

    t = (math.floor(after / 60) + 1) * 60
    limit = after + 10 * 366 * 86400
    while t < limit:
        w = datetime.datetime.fromtimestamp(t, tz)
        before = datetime.datetime.fromtimestamp(t - 60, tz).replace(tzinfo=None)
        naive = w.replace(tzinfo=None)
        if naive - before > datetime.timedelta(minutes=1):          # t ends a gap
            skipped = before + datetime.timedelta(minutes=1)
            while skipped < naive:
                if ok(skipped):
                    return t
                skipped += datetime.timedelta(minutes=1)
        if ok(naive) and w.fold == 0:
            return t
        if not day_ok(naive) and naive.hour < 22:
            # the next local midnight (it exists in these zones); a gap in this day cannot
            # fire, its wall minutes are of this day
            nxt = datetime.datetime.combine(naive.date() + datetime.timedelta(days=1),
                                            datetime.time(0), tzinfo=tz).timestamp()
            t = max(t + 60, nxt)
        elif naive.hour not in e.hours and naive.minute > 0:
            t += (60 - naive.minute) * 60       # whole-hour offsets: the next local hour
        else:
            t += 60
    raise AssertionError("reference found nothing for %r" % expr)


def offset_changes(tz, start, end):
    """The instants in [start, end) where tz's offset changes (an hourly scan, then bisection)."""
    found = []
    offset = local(start, tz).utcoffset()
    for t in range(int(start), int(end), 3600):
        if local(t, tz).utcoffset() != offset:
            lo, hi = t - 3600, t
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if local(mid, tz).utcoffset() == offset else (lo, mid)
            found.append(float(hi))
            offset = local(t, tz).utcoffset()
    return found


def random_field(rng, index):
    _, lo, hi, names = jobrunnerd.CRON_FIELDS[index]
    if index == 4:
        hi = 7

    def value():
        if names and rng.random() < 0.2:
            return names[rng.randint(0, len(names) - 1)]
        return str(rng.randint(lo, hi))

    def item():
        kind = rng.random()
        if kind < 0.3:
            return value()
        a, b = sorted(rng.sample(range(lo, hi + 1), 2))
        if kind < 0.5:
            return "%d-%d" % (a, b)
        if kind < 0.65:
            return "%d-%d/%d" % (a, b, rng.randint(1, 5))
        if kind < 0.8:
            return "%d/%d" % (a, rng.randint(1, 7))
        return "*/%d" % rng.randint(1, 9)

    star = {0: 0.2, 1: 0.4, 2: 0.6, 3: 0.7, 4: 0.6}[index]
    if rng.random() < star:
        return "*"
    return ",".join(item() for _ in range(rng.choice((1, 1, 1, 2, 3))))


def random_expr(rng):
    while True:
        text = " ".join(random_field(rng, i) for i in range(5))
        try:
            CronExpr(text)
        except ValueError:
            continue                    # e.g. "0 0 31 2 *": never fires, refused
        return text


class CrossCheckTest(unittest.TestCase):

    def check(self, tz, count, seed, near=()):
        rng = random.Random(seed)
        start, end = ts(2020, 1, 1), ts(2035, 1, 1)
        for i in range(count):
            expr = random_expr(rng)
            if near and i % 2:          # half of them close to a DST change, most of those
                after = rng.choice(near) + (rng.uniform(-3 * 3600, 3600) if rng.random() < 0.7
                                            else rng.uniform(-2 * 86400, 2 * 86400))
            else:
                after = rng.uniform(start, end)
            if rng.random() < 0.3:
                after = float(math.floor(after / 60) * 60)      # on a minute: strictly after
            got = CronExpr(expr).next_fire(after, tz)
            want = reference_next(expr, after, tz)
            self.assertEqual(got, want, "%r after %s (%s): got %s, want %s"
                             % (expr, after, local(after, tz), local(got, tz), local(want, tz)))

    def test_utc(self):
        self.check(UTC, 1500, seed=15)

    def test_berlin(self):
        tz = zone("Europe/Berlin")
        changes = [ts(y, 3, 31, 1) - ((datetime.date(y, 3, 31).weekday() + 1) % 7) * 86400
                   for y in range(2021, 2031)]
        changes += [ts(y, 10, 31, 1) - ((datetime.date(y, 10, 31).weekday() + 1) % 7) * 86400
                    for y in range(2021, 2031)]
        for t in changes:                # they are the last Sundays: the offset changes there
            self.assertNotEqual(local(t - 1, tz).utcoffset(), local(t, tz).utcoffset())
        self.check(tz, 1500, seed=16, near=changes)

    def test_odd_zones_near_changes(self):
        # Havana changes at midnight (the spring gap is 00:00-01:00, a day without midnight);
        # Lord Howe moves its clocks by 30 minutes.
        for name, seed in (("America/Havana", 18), ("Australia/Lord_Howe", 19)):
            with self.subTest(zone=name):
                tz = zone(name)
                near = offset_changes(tz, ts(2024, 1, 1), ts(2028, 1, 1))
                self.assertGreaterEqual(len(near), 6, "the zone still has DST")
                self.check(tz, 200, seed=seed, near=near)

    def test_new_york_near_changes(self):
        tz = zone("America/New_York")
        changes = [ts(2026, 3, 8, 7), ts(2026, 11, 1, 6), ts(2027, 3, 14, 7), ts(2027, 11, 7, 6)]
        self.check(tz, 300, seed=17, near=changes)


####################################################################################################
#  every, latest_fire, local time
####################################################################################################

def schedule(**spec):
    queues = {spec["queue"]: {}} if "queue" in spec else {}     # a schedule's queue is declared
    cfg = jobrunnerd.Config({"queues": queues,
                             "schedules": {"s": dict({"target": "examples.jobs:echo"}, **spec)}},
                            ROOT)
    return cfg.schedules["s"]


class ScheduleTimesTest(unittest.TestCase):

    def test_every_counts_from_its_anchor(self):
        s = schedule(every=300)
        self.assertEqual(s.next_fire(1000.0), 1300.0)                  # anchor = after: N later
        self.assertEqual(s.next_fire(1000.0, anchor=1000.0), 1300.0)
        self.assertEqual(s.next_fire(1299.9, anchor=1000.0), 1300.0)
        self.assertEqual(s.next_fire(1300.0, anchor=1000.0), 1600.0)   # strictly after
        self.assertEqual(s.next_fire(4321.0, anchor=1000.0), 4600.0)   # the grid is kept
        self.assertEqual(s.next_fire(900.0, anchor=1000.0), 1300.0)
        s = schedule(every=0.1)
        t = 1e9
        for _ in range(1000):
            nxt = s.next_fire(t, anchor=1e9)
            self.assertGreater(nxt, t)
            t = nxt
        self.assertAlmostEqual(t, 1e9 + 100, places=3)

    def test_latest_fire(self):
        s = schedule(cron="0 3 * * *", timezone="UTC")
        self.assertEqual(s.latest_fire(ts(2026, 1, 1, 4), ts(2026, 1, 9, 12)), ts(2026, 1, 9, 3))
        self.assertEqual(s.latest_fire(ts(2026, 1, 1, 4), ts(2026, 1, 9, 3)), ts(2026, 1, 9, 3))
        self.assertIsNone(s.latest_fire(ts(2026, 1, 1, 4), ts(2026, 1, 2, 2, 59)))
        s = schedule(every=60)
        self.assertEqual(s.latest_fire(1000.0, 5000.0, anchor=1000.0), 4960.0)
        self.assertIsNone(s.latest_fire(1000.0, 1059.0, anchor=1000.0))
        rng = random.Random(5)
        tz = "Europe/Berlin" if "Europe/Berlin" in ZONES else "UTC"
        for _ in range(100):
            s = schedule(cron=random_expr(rng), timezone=tz)
            since = rng.uniform(ts(2024, 1, 1), ts(2030, 1, 1))
            until = since + rng.choice((60, 3600, 86400 * 3, 86400 * 40))
            want, t = None, since
            while True:                 # the slow way: every fire in between
                t, before = s.next_fire(t), t
                self.assertGreater(t, before)
                if t > until:
                    break
                want = t
            self.assertEqual(s.latest_fire(since, until), want, s.cron.text)

    def test_local_zone(self):
        with mock.patch.dict(os.environ, {"TZ": "America/New_York"}):
            if "America/New_York" in ZONES:
                name, tz = jobrunnerd.local_zone()
                self.assertEqual(name, "America/New_York")
                self.assertEqual(local(ts(2026, 7, 1), tz).utcoffset(),
                                 datetime.timedelta(hours=-4))
        with mock.patch.dict(os.environ, {"TZ": ":Europe/Berlin"}):
            if "Europe/Berlin" in ZONES:
                self.assertEqual(jobrunnerd.local_zone()[0], "Europe/Berlin")
        with mock.patch.dict(os.environ, {}, clear=False):
            os.environ.pop("TZ", None)
            name, tz = jobrunnerd.local_zone()
            # the same offsets as the C library's local time, over a year
            for t in range(int(ts(2026, 1, 1)), int(ts(2027, 1, 1)), 86400 * 7):
                self.assertEqual(local(t, tz).utcoffset().total_seconds(),
                                 time.localtime(t).tm_gmtoff, name)
        s = schedule(cron="0 0 * * *")
        self.assertTrue(s.local)

    def test_add_request(self):
        s = schedule(cron="@daily", args=[1], priority=5, queue="emails")
        self.assertEqual(s.add_request(), {"target": "examples.jobs:echo", "args": [1],
                                           "priority": 5, "queue": "emails"})
        self.assertEqual(schedule(every=5).add_request(), {"target": "examples.jobs:echo"})
        self.assertEqual(schedule(every=5, timeout=0).add_request()["timeout"], None)   # no limit
        self.assertEqual(schedule(every=5, timeout=2.5).add_request()["timeout"], 2.5)
        self.assertEqual((s.missed, s.overlap), ("once", False))


####################################################################################################
#  Config errors, --check-config
####################################################################################################

class ConfigTest(unittest.TestCase):

    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="jr-test-")
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name

    def write(self, schedules, **top):
        path = os.path.join(self.root, "jobrunnerd.toml")
        with open(path, "w") as f:
            f.write('socket = %s\nstate_dir = %s\nlog_dir = %s\n'
                    % tuple(toml_value(os.path.join(self.root, n)) for n in ("s", "st", "l")))
            for key, value in top.items():
                f.write("%s = %s\n" % (key, toml_value(value)))
            for name, spec in schedules.items():
                f.write("[schedules.%s]\n" % name)
                for key, value in spec.items():
                    text = ("[%s]" % value[0].isoformat() if key == "args"
                            and isinstance(value[0], datetime.date) else toml_value(value))
                    f.write("%s = %s\n" % (key, text))
        return path

    def test_each_error_names_the_schedule_and_the_key(self):
        ok = {"target": "examples.jobs:echo", "cron": "0 3 * * *"}
        for change, words in (
                ({"crn": "x"}, ["crn", "unknown key"]),
                ({"target": None}, ["target", "missing"]),
                ({"target": "nodots"}, ["target"]),
                ({"target": "os:system"}, ["target", "allow list"]),
                ({"method": "_private"}, ["method"]),
                ({"args": "x"}, ["args", "list"]),
                ({"kwargs": [1]}, ["kwargs"]),
                ({"args": [datetime.date(2026, 1, 1)]}, ["args", "JSON"]),
                ({"priority": "high"}, ["priority"]),
                ({"retries": -1}, ["retries"]),
                ({"retry_delay": -1}, ["retry_delay"]),
                ({"backoff": "linear"}, ["backoff"]),
                ({"timeout": -1}, ["timeout"]),
                ({"timeout": False}, ["timeout"]),
                ({"queue": "no spaces"}, ["queue"]),
                ({"every": 60}, ["cron", "exactly one of cron and every"]),
                ({"cron": None}, ["cron", "exactly one"]),
                ({"cron": None, "every": 0}, ["every"]),
                ({"cron": None, "every": -5}, ["every"]),
                ({"cron": None, "every": True}, ["every"]),
                ({"cron": "61 * * * *"}, ["cron", "minute: 61 is out of 0-59"]),
                ({"cron": "*/0 * * * *"}, ["cron", "minute: step 0"]),
                ({"cron": "1,,2 * * * *"}, ["cron", "minute: empty item"]),
                ({"cron": "* * * *"}, ["cron", "5"]),
                ({"cron": 5}, ["cron"]),
                ({"timezone": "Mars/Olympus_Mons"}, ["timezone", "Mars/Olympus_Mons"]),
                ({"timezone": "../etc/passwd"}, ["timezone"]),
                ({"missed": "all"}, ["missed"]),
                ({"overlap": "yes"}, ["overlap"])):
            spec = dict(ok, **change)
            spec = {k: v for k, v in spec.items() if v is not None}
            with self.subTest(change=change):
                with self.assertRaises(ConfigError) as caught:
                    jobrunnerd.load_config(self.write({"nightly": spec}), {})
                message = str(caught.exception)
                self.assertIn("schedule nightly:", message)
                for word in words:
                    self.assertIn(word, message)

    def test_bad_names_and_shapes(self):
        with self.assertRaises(ConfigError) as caught:
            jobrunnerd.Config({"schedules": {"a b": {"target": "examples.jobs:echo",
                                                     "every": 1}}}, self.root)
        self.assertIn("schedule 'a b': name", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            jobrunnerd.Config({"schedules": {"x" * 65: {}}}, self.root)
        self.assertIn("name must be 1-64", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            jobrunnerd.Config({"schedules": {"n": 5}}, self.root)
        self.assertIn("schedule n: must be a table", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            jobrunnerd.Config({"schedules": [1]}, self.root)
        self.assertIn("schedules", str(caught.exception))
        self.assertEqual(jobrunnerd.Config({}, self.root).schedules, {})

    def run_daemon(self, path, *args):
        env = dict(os.environ)
        env.pop("TZ", None)
        return subprocess.run([sys.executable, DAEMON, "--config", path, *args], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=30)

    def test_a_bad_schedule_stops_start_up_and_check_config(self):
        path = self.write({"nightly": {"target": "examples.jobs:echo", "cron": "61 * * * *"}})
        for args in (("--check-config",), ()):
            proc = self.run_daemon(path, *args)
            self.assertEqual(proc.returncode, 2, args)
            self.assertIn("schedule nightly: cron: minute: 61 is out of 0-59", proc.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.root, "s")), "no daemon started")

    def test_check_config_prints_the_next_three_fires(self):
        has_ny = "America/New_York" in ZONES
        path = self.write({
            "leap": {"target": "examples.jobs:echo", "cron": "0 0 29 2 *",
                     "timezone": "America/New_York" if has_ny else "UTC"},
            "poll": {"target": "examples.jobs:echo", "every": 300},
            "nightly": {"target": "examples.jobs:echo", "cron": "30 2 * * *"}})
        before = time.time()
        proc = self.run_daemon(path, "--check-config")
        after = time.time()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = proc.stdout.splitlines()
        self.assertIn("  socket_mode = 0o600", lines)     # as a config file writes it
        heads = [i for i, line in enumerate(lines) if line.startswith("  schedule ")]
        self.assertEqual([lines[i].split(":")[0] for i in heads],
                         ["  schedule leap", "  schedule poll", "  schedule nightly"])
        self.assertIn('cron "0 0 29 2 *" in %s' % ("America/New_York" if has_ny else "UTC"),
                      lines[heads[0]])
        times = {}
        for i in heads:
            name = lines[i].split()[1].rstrip(":")
            nexts = lines[i + 1:i + 4]
            self.assertTrue(all(n.startswith("    next ") for n in nexts), nexts)
            times[name] = [datetime.datetime.fromisoformat(n.split()[1]) for n in nexts]
            for t in times[name]:
                self.assertIsNotNone(t.utcoffset(), "ISO 8601 with an offset")
                self.assertGreater(t.timestamp(), before)
        leap = times["leap"]
        self.assertEqual([(t.month, t.day, t.hour, t.minute) for t in leap], [(2, 29, 0, 0)] * 3)
        first = next(y for y in range(local(before, UTC).year, 3000)
                     if y % 4 == 0 and datetime.datetime(y, 2, 29).timestamp() > before - 86400)
        self.assertEqual([t.year for t in leap], [first, first + 4, first + 8])
        if has_ny:
            self.assertEqual(leap[0].utcoffset(), datetime.timedelta(hours=-5))
        poll = [t.timestamp() for t in times["poll"]]
        self.assertEqual([b - a for a, b in zip(poll, poll[1:])], [300, 300])
        self.assertTrue(before + 299 <= poll[0] <= after + 300)     # printed to the second
        nightly = [t.timestamp() for t in times["nightly"]]     # in the host's local time
        self.assertEqual(nightly, fires("30 2 * * *", before, jobrunnerd.local_zone()[1], 3))


class ReloadTest(support.DaemonTestCase):
    """SIGHUP re-reads the config: one with a bad schedule is refused whole (SPEC §5: the running
    config stays), so the allow list it also changes is not taken either."""

    config = {"schedules": {"nightly": {"target": "examples.jobs:echo", "cron": "0 3 * * *"}}}

    def test_a_bad_schedule_on_sighup_keeps_the_old_config(self):
        d = self.daemon
        self.write_job_module("reloaded", "def f():\n    return 1\n")
        self.assertEqual(d.call(op="add", target="reloaded:f")["error"]["code"], "not_allowed")
        d.config["allow"] = ["examples.*:*", "reloaded:*"]
        d.config["schedules"] = dict(self.config["schedules"], broken={
            "target": "examples.jobs:echo", "cron": "*/0 * * * *"})
        d.write_config()
        d.proc.send_signal(signal.SIGHUP)
        support.wait_until(lambda: "keeping the old config" in d.read_stderr(), 10,
                           message="the refusal on stderr")
        self.assertIn("schedule broken: cron: minute: step 0", d.read_stderr())
        self.assertEqual(d.call(op="add", target="reloaded:f")["error"]["code"], "not_allowed")
        d.config["schedules"] = self.config["schedules"]   # fixed: the same allow list is taken
        d.write_config()
        d.proc.send_signal(signal.SIGHUP)
        support.wait_until(lambda: d.call(op="add", target="reloaded:f")["ok"], 10,
                           message="the new allow list")


if __name__ == "__main__":
    unittest.main()
