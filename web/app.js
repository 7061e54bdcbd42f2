// jobrunner dashboard: one page, three hash routes, plain JavaScript (no framework, nothing
// fetched from elsewhere). The server is `jobctl web`; its JSON API answers the daemon's
// replies. Rules this file keeps:
//  - every string from the daemon (targets, args, output, errors, names) goes in with
//    textContent or a text node, never parsed as markup;
//  - one poll at a time, at most once a second, and only what the route shows: the overview
//    asks /api/overview (counters), the jobs route one page of /api/list, the job route one
//    job and the output past the offset it has. Never the whole table.
//  - after each successful render body.dataset.loaded counts up (the browser tests wait on it).
"use strict";

(function () {
  const TOKEN = document.querySelector('meta[name="jobrunner-token"]').content;
  const STATES = ["blocked", "pending", "running", "succeeded", "failed", "cancelled"];
  const LIVE = new Set(["blocked", "pending", "running"]);
  const POLL_MS = 1000;               // the contract: at most once a second
  const CHART_SECONDS = 3600;         // the throughput chart shows the last hour
  const CHART_KEY = "jobrunner-throughput";  // sessionStorage: the samples outlive a reload
  const PAGE = 50;                    // jobs per page
  const OUTPUT_MAX = 2 * 1024 * 1024; // characters of output kept in the page (the tail)
  const OUTPUT_READS = 4;             // output reads per poll (64 KiB each) while catching up
  const FIELDS = ["id", "target", "method", "args", "kwargs", "priority", "state", "attempts",
    "retries", "retry_delay", "backoff", "timeout", "key", "queue", "after",
    "on_parent_failure", "schedule", "created_at", "run_at", "started_at", "finished_at",
    "pid", "exit_code", "error", "result"];
  const TIME_FIELDS = new Set(["created_at", "run_at", "started_at", "finished_at"]);
  const JSON_FIELDS = new Set(["args", "kwargs", "after", "result"]);

  // The token came in the URL; the page keeps it from the meta tag (and the server's cookie
  // covers reloads), so take it out of the address bar, the history and screenshots.
  if (/[?&]token=/.test(location.search)) {
    history.replaceState(null, "", location.pathname + location.hash);
  }

  // -- DOM helpers: text only ----------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) append(node, child);
    return node;
  }

  function append(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) { child.forEach((c) => append(node, c)); return; }
    node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }

  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  // -- time --------------------------------------------------------------------------

  function pad(n) { return String(n).padStart(2, "0"); }

  function localTime(t) {
    const d = new Date(t * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function span(seconds) {
    seconds = Math.abs(seconds);
    if (seconds >= 86400) return `${Math.floor(seconds / 86400)}d`;
    if (seconds >= 3600) return `${Math.floor(seconds / 3600)}h`;
    if (seconds >= 60) return `${Math.floor(seconds / 60)}m`;
    return `${Math.floor(seconds)}s`;
  }

  function relative(t) {
    const delta = t - Date.now() / 1000;
    if (Math.abs(delta) < 1) return "just now";
    return delta > 0 ? `in ${span(delta)}` : `${span(delta)} ago`;
  }

  function when(t) {
    return typeof t === "number" ? `${localTime(t)} (${relative(t)})` : "–";
  }

  function elapsed(seconds) {
    if (seconds < 1) return `${Math.round(seconds * 1000)}ms`;
    if (seconds < 60) return `${seconds.toFixed(1)}s`;
    const s = Math.floor(seconds);
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    return `${Math.floor(s / 3600)}h ${Math.floor(s % 3600 / 60)}m`;
  }

  // -- the API -------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(code, message, status) {
      super(message);
      this.code = code;
      this.status = status;
    }
  }

  async function api(path, body) {
    const options = { headers: { "X-Jobrunner-Token": TOKEN }, cache: "no-store",
      credentials: "same-origin" };
    if (body !== undefined) {
      options.method = "POST";
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, options);
    } catch (e) {
      throw new ApiError("unreachable", "the dashboard server does not answer: is jobctl web still running?");
    }
    let doc;
    try {
      doc = await response.json();
    } catch (e) {
      throw new ApiError("bad_reply", `HTTP ${response.status} without a JSON body`, response.status);
    }
    if (!doc.ok) {
      const error = doc.error || {};
      throw new ApiError(error.code || "error", error.message || `HTTP ${response.status}`, response.status);
    }
    return doc;
  }

  function query(params) {
    const parts = [];
    for (const [key, value] of Object.entries(params)) {
      if (value !== "" && value !== null && value !== undefined) {
        parts.push(`${encodeURIComponent(key)}=${encodeURIComponent(value)}`);
      }
    }
    return parts.length ? "?" + parts.join("&") : "";
  }

  // -- status line and the render counter ---------------------------------------------

  const status = document.getElementById("status");
  const NOTICE_MS = 10000;      // what an action did (or why it failed) stays this long
  let loaded = 0;
  let notice = null;            // {state, text, until}: the last action's outcome

  function setStatus(state, text) {
    status.dataset.state = state;
    status.textContent = text;
  }

  function errorText(error) {
    return `error${error.code ? ` (${error.code})` : ""}: ${error.message}`;
  }

  function rendered() {
    loaded += 1;
    document.body.dataset.loaded = String(loaded);
    const updated = `updated ${localTime(Date.now() / 1000).slice(11)}`;
    if (notice && Date.now() < notice.until) setStatus(notice.state, `${notice.text} · ${updated}`);
    else setStatus("ok", updated);
  }

  function failed(error) {          // a poll failed: shown until one succeeds
    setStatus("error", errorText(error));
  }

  function tell(state, text) {
    notice = { state, text, until: Date.now() + NOTICE_MS };
    setStatus(state, text);
  }

  // An action: confirm if asked, POST, say what happened, refresh the view at once.
  async function act(path, body, done, question) {
    if (question && !window.confirm(question)) return null;
    try {
      const reply = await api(path, body);
      tell("ok", done(reply));
      refreshNow();
      return reply;
    } catch (e) {
      tell("error", errorText(e));
      return null;
    }
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  // Rows keyed by `key`: kept (so a button being clicked stays in the page), updated in
  // place, new ones made, gone ones removed, in the order of `items`.
  function sync(tbody, items, key, make, update) {
    const old = new Map();
    for (const row of Array.from(tbody.children)) {
      if (row.dataset.key !== undefined) old.set(row.dataset.key, row);
      else tbody.removeChild(row);
    }
    let at = tbody.firstChild;
    for (const item of items) {
      const k = String(key(item));
      let row = old.get(k);
      if (row) old.delete(k);
      else { row = make(item); row.dataset.key = k; }
      update(row, item);
      if (row !== at) tbody.insertBefore(row, at);
      else at = at.nextSibling;
    }
    for (const row of old.values()) tbody.removeChild(row);
  }

  function emptyRow(tbody, columns, text) {
    tbody.appendChild(el("tr", {}, el("td", { colspan: columns, class: "note" }, text)));
  }

  // -- the throughput chart: samples the page keeps ---------------------------------

  const samples = loadSamples();

  function loadSamples() {
    try {
      const kept = JSON.parse(sessionStorage.getItem(CHART_KEY) || "[]");
      return Array.isArray(kept) ? kept.filter((s) => Array.isArray(s) && s.length === 2) : [];
    } catch (e) {
      return [];
    }
  }

  function addSample(t, rate) {
    if (typeof t !== "number" || typeof rate !== "number") return;
    if (samples.length && t <= samples[samples.length - 1][0]) return;
    samples.push([t, rate]);
    while (samples.length && samples[0][0] < t - CHART_SECONDS) samples.shift();
    try {
      sessionStorage.setItem(CHART_KEY, JSON.stringify(samples));
    } catch (e) { /* storage full or off: the chart lives in memory only */ }
  }

  function drawChart(node, now) {
    const W = 720, H = 160, L = 44, B = 20, T = 10, R = 8;
    clear(node);
    node.setAttribute("viewBox", `0 0 ${W} ${H}`);
    const top = Math.max(1, ...samples.map((s) => s[1])) * 1.1;
    const x = (t) => L + (W - L - R) * (1 - (now - t) / CHART_SECONDS);
    const y = (r) => T + (H - T - B) * (1 - r / top);
    node.appendChild(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "frame" }));
    for (const f of [0, 0.5, 1]) {
      const line = svg("line", { x1: L, x2: W - R, y1: y(top * f), y2: y(top * f), class: "grid" });
      node.appendChild(line);
      const label = svg("text", { x: L - 4, y: y(top * f) + 4, class: "axis", "text-anchor": "end" });
      label.textContent = (top * f).toFixed(top * f >= 10 ? 0 : 1);
      node.appendChild(label);
    }
    for (const [t, text] of [[now - CHART_SECONDS, "1 h ago"], [now - 1800, "30 min"], [now, "now"]]) {
      const label = svg("text", { x: x(t), y: H - 4, class: "axis",
        "text-anchor": t === now ? "end" : t === now - CHART_SECONDS ? "start" : "middle" });
      label.textContent = text;
      node.appendChild(label);
    }
    // A gap of more than a minute (the page was elsewhere) breaks the line.
    let points = [];
    const flush = () => {
      if (points.length) node.appendChild(svg("polyline", { points: points.join(" "), class: "rate" }));
      points = [];
    };
    let last = null;
    for (const [t, r] of samples) {
      if (t < now - CHART_SECONDS) continue;
      if (last !== null && t - last > 60) flush();
      points.push(`${x(t).toFixed(1)},${y(r).toFixed(1)}`);
      last = t;
    }
    flush();
    const title = svg("title");
    title.textContent = "jobs finished per second (over the last minute), sampled while this page shows the overview";
    node.appendChild(title);
  }

  // -- views -----------------------------------------------------------------------------
  // Each view builds its frame once (build), then each poll fetches and updates (refresh).

  function overviewView() {
    let queues, schedules, chart, running, failures, paused, rate;
    return {
      route: "overview",
      build(main) {
        const resumeAll = el("button", { type: "button", "data-action": "resume-daemon" }, "Resume");
        resumeAll.addEventListener("click", () => act("/api/resume", {},
          (r) => (r.paused ? "the daemon is still paused" : "the daemon runs again")));
        paused = el("p", { id: "daemon-paused", class: "banner", hidden: true },
          "The whole daemon is paused: no new attempts start in any queue. ", resumeAll);
        const head = el("tr", {}, el("th", {}, "Queue"), el("th", { class: "num" }, "Slots"),
          el("th", {}, "Paused"), STATES.map((s) => el("th", { class: "num" }, s)), el("th", {}, ""));
        queues = el("tbody");
        chart = svg("svg", { id: "throughput", role: "img", "aria-label": "jobs finished per second, last hour" });
        rate = el("span", { id: "rate" });
        schedules = el("tbody");
        running = el("tbody");
        failures = el("tbody");
        append(main, [
          paused,
          el("section", {}, el("h2", {}, "Queues"),
            el("table", { id: "queues" }, el("thead", {}, head), queues)),
          el("section", {}, el("h2", {}, "Finished per second, last hour ", rate), chart),
          el("section", {}, el("h2", {}, "Schedules"),
            el("table", { id: "schedules" }, el("thead", {}, el("tr", {},
              ["Schedule", "When", "Target", "Queue", "Next fire", "Last run", "Paused", ""]
                .map((h) => el("th", {}, h)))), schedules)),
          el("section", { class: "pair" },
            el("div", {}, el("h2", {}, "Running"), el("table", { id: "running" },
              el("thead", {}, el("tr", {}, ["Job", "Queue", "Target", "Running for"].map((h) => el("th", {}, h)))),
              running)),
            el("div", {}, el("h2", {}, "Latest failures"), el("table", { id: "failures" },
              el("thead", {}, el("tr", {}, ["Job", "When", "Queue", "Outcome", "Error"].map((h) => el("th", {}, h)))),
              failures))),
        ]);
      },
      async refresh() {
        const doc = await api("/api/overview");
        return () => {
          paused.hidden = !doc.stats.paused;
          fillQueues(doc.queues || []);
          const activity = doc.activity || {};
          addSample(activity.now, activity.finished_per_second);
          rate.textContent = typeof activity.finished_per_second === "number"
            ? `(now ${activity.finished_per_second.toFixed(2)}/s)` : "";
          drawChart(chart, typeof activity.now === "number" ? activity.now : Date.now() / 1000);
          fillSchedules(doc.schedules);
          fillActivity(activity);
        };
      },
    };

    function fillQueues(list) {
      sync(queues, list, (q) => q.name, makeQueue, (row, q) => {
        const counts = q.counts || {};
        row.toggleAttribute("data-paused", !!q.paused);
        setText(row.querySelector(".declared"), q.declared === false ? " (not declared)" : "");
        setText(row.querySelector('[data-field="slots"]'), `${q.running}/${q.workers}`);
        setText(row.querySelector('[data-field="paused"]'), q.paused ? "paused" : "no");
        for (const s of STATES) {
          const cell = row.querySelector(`[data-state="${s}"]`);
          setText(cell.firstChild, String(counts[s] || 0));
          cell.classList.toggle("zero", !counts[s]);
        }
        const button = row.querySelector("button");
        button.dataset.action = q.paused ? "resume" : "pause";
        setText(button, q.paused ? "Resume" : "Pause");
      });
    }

    function makeQueue(q) {
      const button = el("button", { type: "button", "data-action": "pause" }, "Pause");
      button.addEventListener("click", () => act(`/api/${button.dataset.action}`, { queue: q.name },
        (r) => `queue ${q.name}: ${r.paused ? "paused" : "resumed"}`));
      return el("tr", { "data-queue": q.name },
        el("th", { scope: "row" }, el("a", { href: `#/jobs${query({ queue: q.name })}` }, q.name),
          el("span", { class: "note declared" })),
        el("td", { class: "num", "data-field": "slots" }),
        el("td", { "data-field": "paused" }),
        STATES.map((s) => el("td", { class: `num count state-${s}`, "data-state": s },
          el("a", { href: `#/jobs${query({ queue: q.name, state: s })}` }, "0"))),
        el("td", {}, button));
    }

    function fillSchedules(list) {
      if (!Array.isArray(list)) {
        clear(schedules);
        emptyRow(schedules, 8, "this daemon has no schedules");
        return;
      }
      sync(schedules, list, (s) => s.name, makeSchedule, (row, s) => {
        const expression = s.cron !== undefined && s.cron !== null ? `cron ${s.cron}`
          : s.every !== undefined && s.every !== null ? `every ${s.every}s` : "–";
        row.toggleAttribute("data-paused", !!s.paused);
        setText(row.querySelector(".declared"), s.declared === false ? " (not declared)" : "");
        setText(row.querySelector('[data-field="expression"]'),
          expression + (s.timezone ? ` (${s.timezone})` : ""));
        setText(row.querySelector('[data-field="target"]'), s.target || "–");
        setText(row.querySelector('[data-field="queue"]'), s.queue || "default");
        setText(row.querySelector('[data-field="next_run_at"]'), s.paused ? "paused" : when(s.next_run_at));
        const last = row.querySelector('[data-field="last_run_at"]');
        clear(last);
        append(last, typeof s.last_run_at === "number" ? [when(s.last_run_at),
          s.last_job_id !== null && s.last_job_id !== undefined
            ? [" ", el("a", { href: `#/job/${s.last_job_id}` }, `job ${s.last_job_id}`),
              s.last_job_state ? ` ${s.last_job_state}` : ""] : null] : "–");
        setText(row.querySelector('[data-field="paused"]'), s.paused ? "paused" : "no");
        const button = row.querySelector('[data-role="switch"]');
        button.dataset.action = s.paused ? "resume" : "pause";
        setText(button, s.paused ? "Resume" : "Pause");
      });
      if (!list.length) emptyRow(schedules, 8, "none declared");
    }

    function makeSchedule(s) {
      const trigger = el("button", { type: "button", "data-action": "trigger" }, "Run now");
      const toggle = el("button", { type: "button", "data-action": "pause", "data-role": "switch" }, "Pause");
      trigger.addEventListener("click", () => act("/api/trigger", { name: s.name }, (r) => r.created
        ? `schedule ${s.name}: queued job ${r.id}` : `schedule ${s.name}: job ${r.id} is still live (it does not overlap)`));
      toggle.addEventListener("click", () => act(`/api/${toggle.dataset.action}`, { schedule: s.name },
        (r) => `schedule ${s.name}: ${r.paused ? "paused" : "resumed"}`));
      return el("tr", { "data-schedule": s.name },
        el("th", { scope: "row" }, el("a", { href: `#/jobs${query({ schedule: s.name })}` }, s.name),
          el("span", { class: "note declared" })),
        el("td", { "data-field": "expression" }), el("td", { class: "target", "data-field": "target" }),
        el("td", { "data-field": "queue" }), el("td", { "data-field": "next_run_at" }),
        el("td", { "data-field": "last_run_at" }), el("td", { "data-field": "paused" }),
        el("td", { class: "actions" }, trigger, toggle));
    }

    function fillActivity(activity) {
      const now = typeof activity.now === "number" ? activity.now : Date.now() / 1000;
      clear(running);
      for (const j of activity.running || []) {
        running.appendChild(el("tr", { "data-job-id": j.id },
          el("td", {}, el("a", { href: `#/job/${j.id}` }, String(j.id))), el("td", {}, j.queue),
          el("td", { class: "target" }, j.target + (j.method && j.method !== "handle" ? ` (${j.method})` : "")),
          el("td", {}, typeof j.started_at === "number" ? elapsed(Math.max(0, now - j.started_at)) : "–")));
      }
      if ((activity.running_total || 0) > (activity.running || []).length) {
        running.appendChild(el("tr", {}, el("td", { colspan: 4, class: "note" },
          `and ${activity.running_total - activity.running.length} more: `,
          el("a", { href: "#/jobs?state=running" }, "all running jobs"))));
      } else if (!(activity.running || []).length) {
        running.appendChild(el("tr", {}, el("td", { colspan: 4, class: "note" }, "none")));
      }
      clear(failures);
      for (const f of (activity.failures || []).slice(0, 10)) {
        failures.appendChild(el("tr", { "data-job-id": f.id },
          el("td", {}, el("a", { href: `#/job/${f.id}` }, String(f.id))),
          el("td", {}, typeof f.at === "number" ? relative(f.at) : "–"), el("td", {}, f.queue),
          el("td", {}, f.outcome), el("td", { class: "error" }, f.error || "")));
      }
      if (!(activity.failures || []).length) {
        failures.appendChild(el("tr", {}, el("td", { colspan: 5, class: "note" }, "none since the daemon started")));
      }
    }
  }

  function jobsView(params) {
    const filters = { state: params.get("state") || "", queue: params.get("queue") || "",
      target: params.get("target") || "", schedule: params.get("schedule") || "" };
    const before = params.get("before_id") || "", after = params.get("after_id") || "";
    let tbody, older, newer, summary, page = null;
    const go = (extra) => { location.hash = `#/jobs${query({ ...filters, ...extra })}`; };
    return {
      route: "jobs",
      build(main) {
        const stateSelect = el("select", { name: "state" }, el("option", { value: "" }, "any state"),
          STATES.map((s) => el("option", { value: s, selected: s === filters.state }, s)));
        const queueSelect = el("select", { name: "queue" }, el("option", { value: "" }, "any queue"),
          filters.queue ? el("option", { value: filters.queue, selected: true }, filters.queue) : null);
        const form = el("form", { id: "filters" },
          el("label", {}, "State ", stateSelect), el("label", {}, "Queue ", queueSelect),
          el("label", {}, "Target ", el("input", { name: "target", value: filters.target,
            placeholder: "pattern, e.g. app.jobs:*", size: 24 })),
          el("label", {}, "Schedule ", el("input", { name: "schedule", value: filters.schedule, size: 12 })),
          el("button", { type: "submit" }, "Filter"),
          el("button", { type: "button", "data-action": "clear" }, "Clear"));
        const read = () => {
          const data = new FormData(form);
          return { state: data.get("state"), queue: data.get("queue"),
            target: String(data.get("target")).trim(), schedule: String(data.get("schedule")).trim() };
        };
        form.addEventListener("submit", (e) => { e.preventDefault(); Object.assign(filters, read()); go({}); });
        for (const select of [stateSelect, queueSelect]) {
          select.addEventListener("change", () => { Object.assign(filters, read()); go({}); });
        }
        form.querySelector('[data-action="clear"]').addEventListener("click", () => {
          location.hash = "#/jobs";
        });
        // The queue names, once (not polled): the select offers them.
        api("/api/overview").then((doc) => {
          for (const q of doc.queues || []) {
            if (q.name !== filters.queue) queueSelect.appendChild(el("option", { value: q.name }, q.name));
          }
        }, () => {});
        const where = () => Object.fromEntries(Object.entries(filters).filter(([, v]) => v));
        const bulkCancel = el("button", { type: "button", "data-action": "bulk-cancel" }, "Cancel all matching");
        const bulkRetry = el("button", { type: "button", "data-action": "bulk-retry" }, "Retry all matching");
        const anyFilter = Object.keys(where()).length > 0;
        for (const [button, path, verb, states] of [
          [bulkCancel, "/api/cancel", "cancel", "blocked, pending or running"],
          [bulkRetry, "/api/retry", "retry", "failed or cancelled"]]) {
          button.disabled = !anyFilter;
          button.title = anyFilter ? `${verb} every ${states} job that matches the filter`
            : "set a filter first: the action covers every job that matches it";
          button.addEventListener("click", () => {
            const count = page ? `${page.total} job${page.total === 1 ? "" : "s"} match` : "jobs match";
            act(path, { where: where() }, (r) => `${r.ids.length} job${r.ids.length === 1 ? "" : "s"} ${verb === "cancel" ? "cancelled" : "retried"}`,
              `${count} ${JSON.stringify(where())}. ${verb[0].toUpperCase() + verb.slice(1)} every ${states} one of them?`);
          });
        }
        tbody = el("tbody");
        older = el("button", { type: "button", id: "older" }, "Older →");
        newer = el("button", { type: "button", id: "newer" }, "← Newer");
        summary = el("span", { id: "summary" });
        older.addEventListener("click", () => {
          const rows = page && page.jobs;
          if (rows && rows.length) go({ before_id: rows[rows.length - 1].id });
        });
        newer.addEventListener("click", () => {
          const rows = page && page.jobs;
          if (rows && rows.length) go({ after_id: rows[0].id });
        });
        append(main, [
          el("section", {}, el("h2", {}, "Jobs"), form,
            el("div", { class: "bulk" }, bulkCancel, bulkRetry)),
          el("table", { id: "jobs" }, el("thead", {}, el("tr", {},
            ["ID", "State", "Queue", "Priority", "Attempts", "Target", "Created", "Time", "Exit", "Error"]
              .map((h) => el("th", {}, h)))), tbody),
          el("div", { class: "pager" }, newer, summary, older),
        ]);
      },
      async refresh() {
        const doc = await api(`/api/list${query({ ...filters, before_id: before, after_id: after, limit: PAGE })}`);
        return () => {
          page = doc;
          const now = Date.now() / 1000;
          sync(tbody, doc.jobs, (j) => j.id, makeJobRow, (row, j) => fillJobRow(row, j, now));
          if (!doc.jobs.length) emptyRow(tbody, 10, "no jobs match");
          // `more`: more match past this page in the direction it was read
          older.disabled = !doc.jobs.length || (after ? false : !doc.more);
          newer.disabled = !doc.jobs.length || (after ? !doc.more : !before);
          const first = doc.jobs.length ? doc.jobs[0].id : null;
          const last = doc.jobs.length ? doc.jobs[doc.jobs.length - 1].id : null;
          summary.textContent = doc.jobs.length
            ? `${doc.jobs.length} of ${doc.total} matching (ids ${first}–${last})`
            : `0 of ${doc.total} matching`;
        };
      },
    };
  }

  const JOB_COLUMNS = ["id", "state", "queue", "priority", "attempts", "target", "created",
    "time", "exit_code", "error"];

  function makeJobRow(j) {
    const row = el("tr", { "data-job-id": j.id },
      JOB_COLUMNS.map((c) => el("td", { "data-field": c, class: `col-${c}` })));
    row.firstChild.appendChild(el("a", { href: `#/job/${j.id}` }, String(j.id)));
    return row;
  }

  function fillJobRow(row, j, now) {
    const target = j.target + (j.method && j.method !== "handle" ? ` (${j.method})` : "");
    const retries = typeof j.retries === "number" ? j.retries + 1 : "?";
    let time = "–";
    if (j.state === "pending" && typeof j.run_at === "number" && j.run_at > now + 1) time = relative(j.run_at);
    else if (j.state === "pending") time = "due";
    else if (j.state === "blocked" && Array.isArray(j.after)) time = `after ${j.after.slice(0, 3).join(",")}${j.after.length > 3 ? ",…" : ""}`;
    else if (j.state === "running" && typeof j.started_at === "number") time = elapsed(Math.max(0, now - j.started_at));
    else if (typeof j.started_at === "number" && typeof j.finished_at === "number") time = elapsed(Math.max(0, j.finished_at - j.started_at));
    const error = String(j.error || "").split("\n")[0];
    const cell = (name) => row.querySelector(`[data-field="${name}"]`);
    const state = cell("state");
    state.className = `col-state state state-${j.state}`;
    setText(state, String(j.state));
    setText(cell("queue"), String(j.queue));
    setText(cell("priority"), String(j.priority));
    setText(cell("attempts"), `${j.attempts}/${retries}`);
    setText(cell("target"), target);
    setText(cell("created"), typeof j.created_at === "number" ? relative(j.created_at) : "–");
    cell("created").title = typeof j.created_at === "number" ? localTime(j.created_at) : "";
    setText(cell("time"), time);
    setText(cell("exit_code"), j.exit_code === null || j.exit_code === undefined ? "–" : String(j.exit_code));
    setText(cell("error"), error);
    cell("error").title = error;
  }

  function jobView(id) {
    let section, fields, output, cancel, retry, priority, setPriority, note;
    let offset = 0, eof = false, text = "", dropped = 0;
    let unseen = [];            // output read but not yet shown (a later read may fail)
    return {
      route: "job",
      build(main) {
        fields = el("dl", { class: "record" });
        output = el("pre", { id: "job-output" });
        note = el("p", { class: "note", id: "output-note" });
        cancel = el("button", { type: "button", "data-action": "cancel" }, "Cancel");
        retry = el("button", { type: "button", "data-action": "retry" }, "Retry");
        priority = el("input", { id: "priority", type: "number", step: 1, "aria-label": "priority" });
        setPriority = el("button", { type: "button", "data-action": "priority" }, "Set priority");
        cancel.addEventListener("click", () => act("/api/cancel", { id }, (r) => `job ${id}: ${r.job.state}`,
          `Cancel job ${id}?`));
        retry.addEventListener("click", () => act("/api/retry", { id }, (r) => `job ${id}: ${r.job.state}`));
        setPriority.addEventListener("click", () => {
          const value = Number(priority.value);
          if (priority.value.trim() === "" || !Number.isInteger(value)) {
            setStatus("error", "error: the priority is a whole number");
            return;
          }
          act("/api/update", { id, priority: value }, (r) => `job ${id}: priority ${r.job.priority}`)
            .then((reply) => { if (reply) priority.dataset.editing = ""; });
        });
        priority.addEventListener("input", () => { priority.dataset.editing = "1"; });
        section = el("section", { id: "job", "data-job-id": id },
          el("h2", {}, `Job ${id}`),
          el("div", { class: "actions" }, cancel, retry, priority, setPriority),
          fields,
          el("h3", {}, "Output"), note, output);
        main.appendChild(section);
      },
      async refresh() {
        const doc = await api(`/api/job${query({ id })}`);
        const job = doc.job;
        // Follow the output: what is past our offset, a few reads per poll while catching up.
        if (!eof || LIVE.has(job.state)) {
          for (let n = 0; n < OUTPUT_READS; n++) {
            const chunk = await api(`/api/output${query({ id, offset })}`);
            if (chunk.offset < offset) break;
            offset = chunk.offset;
            eof = chunk.eof;
            if (chunk.data) unseen.push(chunk.data);
            if (!chunk.data || chunk.eof) break;
          }
        }
        return () => {
          fillRecord(job);
          if (unseen.length) addOutput(unseen.join(""));
          unseen = [];
          if (!text) {
            note.textContent = eof ? "no output" : LIVE.has(job.state) ? "no output yet: followed while the job runs" : "";
          } else {
            note.textContent = (dropped ? `the first ${dropped} characters are not shown (jobctl logs ${id} has all); ` : "")
              + (LIVE.has(job.state) ? "followed while the job runs" : "");
          }
        };
      },
    };

    function fillRecord(job) {
      const names = FIELDS.filter((f) => f in job).concat(Object.keys(job).filter((f) => !FIELDS.includes(f)).sort());
      sync(fields, names, (name) => name,
        (name) => el("div", {}, el("dt", {}, name), el("dd", { "data-field": name })),
        (entry, name) => {
          const value = job[name];
          let shown;
          if (value === null || value === undefined) shown = "–";
          else if (TIME_FIELDS.has(name) && typeof value === "number") shown = when(value);
          else if (JSON_FIELDS.has(name) || typeof value === "object") shown = JSON.stringify(value);
          else shown = String(value);
          const dd = entry.lastChild;
          setText(dd, shown);
          if (name === "state") dd.className = `state state-${value}`;
          if (TIME_FIELDS.has(name) && typeof value === "number") dd.title = new Date(value * 1000).toISOString();
          if (name === "attempts") dd.title = `of at most ${typeof job.retries === "number" ? job.retries + 1 : "?"}`;
        });
      section.dataset.state = job.state;
      cancel.disabled = !LIVE.has(job.state);
      retry.disabled = !(job.state === "failed" || job.state === "cancelled");
      const editable = job.state === "blocked" || job.state === "pending";
      priority.disabled = setPriority.disabled = !editable;
      if (!priority.dataset.editing) priority.value = String(job.priority);
    }

    function addOutput(data) {
      text += data;
      if (text.length > OUTPUT_MAX) {           // keep the tail: it is what a follower reads
        const cut = text.length - OUTPUT_MAX;
        dropped += cut;
        text = text.slice(cut);
        clear(output);
        appendLines(text);
      } else {
        appendLines(data);
      }
      // Follow the end while the reader is at the end.
      const atEnd = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
      if (atEnd) window.scrollTo(0, document.body.scrollHeight);
    }

    // The daemon's own lines ("[jobrunner] attempt 1/3 ...") stand out; the rest is plain text.
    function appendLines(data) {
      const lines = data.split(/(?<=\n)/);
      let plain = "";
      for (const line of lines) {
        if (line.startsWith("[jobrunner] ")) {
          if (plain) { output.appendChild(document.createTextNode(plain)); plain = ""; }
          const failedLine = /^\[jobrunner\] attempt \S+ (failed|timed out|killed|cancelled)/.test(line);
          output.appendChild(el("span", { class: failedLine ? "attempt attempt-failed" : "attempt" }, line));
        } else {
          plain += line;
        }
      }
      if (plain) output.appendChild(document.createTextNode(plain));
    }
  }

  // -- routing and polling -----------------------------------------------------------------

  const main = document.getElementById("view");
  let view = null;
  let generation = 0;           // bumped on each route change: late replies of the old one are dropped
  let timer = null;
  let busy = false;
  let again = false;            // a refresh was asked for while one was under way

  function route() {
    const hash = location.hash.replace(/^#/, "") || "/";
    const [path, search] = hash.split("?");
    const params = new URLSearchParams(search || "");
    let found;
    if (path === "/jobs") found = jobsView(params);
    else if (/^\/job\/\d+$/.test(path)) found = jobView(Number(path.slice(5)));
    else found = overviewView();
    generation += 1;
    view = found;
    document.body.dataset.route = view.route;
    for (const link of document.querySelectorAll("[data-nav]")) {
      link.classList.toggle("current", link.dataset.nav === (view.route === "job" ? "jobs" : view.route));
    }
    clear(main);
    view.build(main);
    document.title = view.route === "job" ? `job ${path.slice(5)} · jobrunner` : view.route === "jobs" ? "jobs · jobrunner" : "jobrunner";
    refreshNow();
  }

  async function poll() {
    clearTimeout(timer);
    timer = null;
    if (busy) { again = true; return; }
    busy = true;
    const mine = generation;
    try {
      const paint = await view.refresh();
      if (mine === generation) {
        paint();
        rendered();
      }
    } catch (e) {
      if (mine === generation) failed(e);
    } finally {
      busy = false;
      if (again) {
        again = false;
        poll();
      } else if (!document.hidden) {
        timer = setTimeout(poll, POLL_MS);
      }
    }
  }

  function refreshNow() {
    poll();
  }

  // A hidden tab asks nothing; it catches up when shown again.
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && timer === null && !busy) poll();
  });
  window.addEventListener("hashchange", route);
  route();
})();
