"use strict";
(function () {
  var REFRESH_MS = 5000;
  var params = new URLSearchParams(window.location.search);
  var token = params.get("token") || "";
  var lastOk = 0;
  var skewMs = 0;  // browser clock minus server clock, from /status's "time"
  var HEADER_KEYS = ["bot", "version", "uptime_seconds", "time", "sandbox", "backend", "stopping", "starting"];
  var ORDER = ["last_error", "trends", "session_key", "loops", "accounts", "fleet", "channels", "queues", "breakers", "history_jobs", "resources",
               "counters", "outbound", "sync", "jobs", "heartbeat", "alerts", "watchdog", "sandbox_world"];
  var BAD = ["failing", "failed", "open", "dead", "error", "key_mismatch", "stopped", "crashed", "exhausted", "down", "unhealthy"];
  var WARN = ["half_open", "degraded", "restarting", "retrying", "stale", "rate_limited", "waiting", "paused", "starting",
              "flood_wait", "limited", "backoff", "connecting", "pending", "needs_login"];
  var GOOD = ["ok", "running", "closed", "healthy", "connected", "ready", "idle", "done", "active", "alive", "online", "sent"];
  // Per section: the columns worth a glance, in order; then the rest minus HIDE.
  var COLUMNS = {
    loops: ["state", "last_ping", "last_ping_ago_s", "restarts", "cycles", "cycle_errors", "last_error", "last_error_at", "last_restart_reason"],
    accounts: ["state", "fix", "connected", "lease", "queue_depth", "sent", "failed", "received", "reconnects", "connected_since",
               "flood_wait_until", "limited_until", "last_error", "last_error_at"],
    channels: ["state", "last_message_id", "stored", "skipped", "failed", "last_error", "last_error_at"],
    breakers: ["state", "consecutive_failures", "failures", "retry_in_s", "times_opened", "rejected_calls", "last_error", "last_error_at"],
    history_jobs: ["job_id", "account", "channel", "chat_id", "fetched", "stored", "target", "done", "percent"],
    fleet: ["state", "this", "host", "pid", "version", "last_heartbeat_at", "held", "target", "pinned"]
  };
  var HIDE = {
    loops: ["alive", "max_silence_s", "restarts_in_window", "abandoned"],
    accounts: ["id"],
    fleet: ["heartbeat_age_s"],
    breakers: ["name", "failure_threshold", "recovery_timeout_s", "half_open_max_calls", "success_threshold",
               "total_successes", "total_failures", "last_change_at"]
  };
  var NAME_LABEL = { loops: "loop", accounts: "account", channels: "channel", breakers: "breaker", queues: "queue", fleet: "replica" };
  var LABELS = { last_ping_ago_s: "last ping", retry_in_s: "retry in", queue_depth: "queue depth", connected_since: "connected since",
                 flood_wait_until: "flood wait until", limited_until: "limited until", last_error_at: "last error at", last_ok_at: "last ok", uptime_seconds: "uptime" };
  var HEADS = { last_ping: "last ping", consecutive_failures: "failures", queue_depth: "queue", cycle_errors: "errors",
                last_restart_reason: "restart reason", connected_since: "since", flood_wait_until: "flood wait", limited_until: "limited",
                times_opened: "opened", rejected_calls: "rejected", last_error_at: "error at", chat_id: "chat", job_id: "job",
                last_heartbeat_at: "last heartbeat", held: "accounts held", target: "target share" };
  var EMPTY = { history_jobs: "no history sync jobs", queues: "no retry queues", accounts: "no accounts", channels: "no channels",
                fleet: "no replica seen yet" };
  var WIDE = ["loops", "accounts", "fleet", "channels", "breakers", "history_jobs"];

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }
  function byId(id) { return document.getElementById(id); }
  function isObj(v) { return v !== null && typeof v === "object" && !Array.isArray(v); }
  function isScalar(v) { return v === null || v === undefined || typeof v !== "object"; }
  function head(key) { return HEADS[key] || title(key); }
  function title(key) {
    if (LABELS[key]) { return LABELS[key]; }
    return String(key).replace(/_ago_s$/, "").replace(/_s$/, "").replace(/_/g, " ");
  }
  function fmtDuration(sec) {
    sec = Math.max(0, sec);
    if (sec < 10 && sec !== Math.round(sec)) { return (Math.round(sec * 10) / 10) + "s"; }
    sec = Math.round(sec);
    var d = Math.floor(sec / 86400), h = Math.floor(sec % 86400 / 3600), m = Math.floor(sec % 3600 / 60), s = sec % 60;
    if (d) { return d + "d " + h + "h"; }
    if (h) { return h + "h " + m + "m"; }
    if (m) { return m + "m " + s + "s"; }
    return s + "s";
  }
  function now() { return Date.now() - skewMs; }
  function fmtAgo(d) {
    var diff = (now() - d.getTime()) / 1000;
    return diff >= -1 ? fmtDuration(diff) + " ago" : "in " + fmtDuration(-diff);
  }
  function fmtAbs(d) { return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z"); }
  function asDate(key, v) {
    if (typeof v === "string" && /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}/.test(v)) {
      var d = new Date(v); return isNaN(d.getTime()) ? null : d;
    }
    if (typeof v === "number" && /(_at|_time|^time|ping|seen|heartbeat|_since|_until)$/.test(key) && v > 1e9 && v < 1e11) {
      return new Date(v * 1000);
    }
    return null;
  }
  function stateClass(v) {
    if (typeof v !== "string") { return ""; }
    var s = v.toLowerCase();
    if (BAD.indexOf(s) >= 0) { return "bad"; }
    if (WARN.indexOf(s) >= 0) { return "warn"; }
    if (GOOD.indexOf(s) >= 0) { return "ok"; }
    return "";
  }
  function percentOf(row) {
    if (!isObj(row)) { return null; }
    if (typeof row.percent === "number") { return row.percent; }
    var done = row.done !== undefined && typeof row.done === "number" ? row.done : (row.fetched !== undefined ? row.fetched : row.processed);
    var total = typeof row.total === "number" ? row.total : row.target;
    if (typeof done === "number" && typeof total === "number" && total > 0) { return 100 * done / total; }
    if (row.done === true) { return 100; }
    return null;
  }
  function bar(pct, fillClass) {
    var wrap = el("div", "bar");
    var fill = el("span", fillClass || null);
    var p = Math.max(0, Math.min(100, pct));
    fill.style.width = p.toFixed(1) + "%";
    wrap.appendChild(fill);
    wrap.appendChild(el("em", null, p.toFixed(1) + "%"));
    return wrap;
  }
  function inline(obj) {
    var keys = Object.keys(obj);
    if (!keys.length) { return null; }
    if (!keys.every(function (k) { return isScalar(obj[k]); })) { return null; }
    return keys.map(function (k) { return title(k) + " " + (obj[k] === null ? "-" : String(obj[k])); }).join(", ");
  }
  function cell(key, v) {
    var td = el("td");
    if (key === "percent" && typeof v === "number") { td.appendChild(bar(v)); return td; }
    if (/_ago_s$/.test(key) && typeof v === "number") { td.textContent = fmtDuration(v) + " ago"; return td; }
    var d = asDate(key, v);
    if (d) {
      td.textContent = fmtAgo(d);
      td.title = fmtAbs(d);
      return td;
    }
    if (v === null || v === undefined || v === "") { td.className = "muted"; td.textContent = "-"; return td; }
    if (typeof v === "number") {
      td.className = "num";
      td.textContent = /_s$/.test(key) ? fmtDuration(v) : String(Math.round(v * 1000) / 1000);
      return td;
    }
    if (typeof v === "boolean") {
      td.textContent = v ? "yes" : "no";
      if (key === "connected" || key === "alive" || key === "healthy" || key === "monitor_alive") { td.className = v ? "ok" : "bad"; }
      return td;
    }
    if (Array.isArray(v)) {
      if (!v.length) { td.className = "muted"; td.textContent = "-"; return td; }
      if (v.every(isScalar)) { td.className = "text"; td.textContent = v.map(String).join(", "); return td; }
    }
    if (typeof v === "object") {
      var flat = isObj(v) ? inline(v) : null;
      if (isObj(v) && !Object.keys(v).length) { td.className = "muted"; td.textContent = "-"; return td; }
      if (flat !== null) { td.className = "text"; td.textContent = flat; return td; }
      td.appendChild(el("pre", null, JSON.stringify(v, null, 1)));
      return td;
    }
    td.textContent = String(v);
    var c = stateClass(v);
    if (c) { td.className = c; }
    else if (/(^|_)(error|reason)$/.test(key)) { td.className = "text err"; }
    else if (String(v).length > 40) { td.className = "text"; }
    return td;
  }
  function columnsFor(section, rows) {
    var seen = [];
    rows.forEach(function (r) { Object.keys(r.data).forEach(function (k) { if (seen.indexOf(k) < 0) { seen.push(k); } }); });
    var hide = HIDE[section] || [];
    var preferred = COLUMNS[section] || [];
    var cols = preferred.filter(function (k) { return seen.indexOf(k) >= 0; });
    seen.forEach(function (k) { if (cols.indexOf(k) < 0 && hide.indexOf(k) < 0) { cols.push(k); } });
    // A column that says nothing for any row is left out (no "-" columns).
    return cols.filter(function (k) {
      return k === "state" || rows.some(function (r) { var v = r.data[k]; return v !== null && v !== undefined && v !== ""; });
    });
  }
  function table(section, rows, nameKey) {
    var cols = columnsFor(section, rows);
    var withPct = rows.some(function (r) { return percentOf(r.data) !== null; });
    if (withPct && cols.indexOf("percent") < 0) { cols.push("percent"); }
    var t = el("table", "grid"), headRow = el("tr");
    if (nameKey) { headRow.appendChild(el("th", null, nameKey)); }
    cols.forEach(function (c) {
      var numeric = rows.some(function (r) { return typeof r.data[c] === "number"; }) &&
        rows.every(function (r) { var v = r.data[c]; return v === null || v === undefined || typeof v === "number"; }) &&
        c !== "percent" && !/(_at|_since|_until|ping|_ago_s|_id)$/.test(c);
      headRow.appendChild(el("th", numeric ? "num" : null, c === "percent" ? "progress" : head(c)));
    });
    t.appendChild(headRow);
    rows.forEach(function (r) {
      var tr = el("tr");
      if (nameKey) { tr.appendChild(el("th", "row", r.name)); }
      cols.forEach(function (c) {
        if (c === "percent" && withPct) {
          var pct = percentOf(r.data), td = el("td");
          if (pct !== null) { td.appendChild(bar(pct)); } else { td.className = "muted"; td.textContent = "-"; }
          tr.appendChild(td);
        } else {
          tr.appendChild(cell(c, r.data[c]));
        }
      });
      t.appendChild(tr);
    });
    return t;
  }
  function kvTable(obj) {
    var t = el("table", "kv");
    Object.keys(obj).forEach(function (k) {
      var tr = el("tr");
      tr.appendChild(el("th", null, title(k)));
      tr.appendChild(cell(k, obj[k]));
      t.appendChild(tr);
    });
    return t;
  }
  function none(section) { return el("div", "none", EMPTY[section] || "(none)"); }
  function render(section, value) {
    if (Array.isArray(value)) {
      if (!value.length) { return none(section); }
      if (value.every(isObj)) {
        return table(section, value.map(function (r, i) { return { name: String(r.name || r.id || i), data: r }; }), null);
      }
      return el("pre", null, value.map(String).join("\n"));
    }
    if (isObj(value)) {
      var keys = Object.keys(value);
      if (!keys.length) { return none(section); }
      if (keys.every(function (k) { return isObj(value[k]); })) {
        return table(section, keys.map(function (k) { return { name: k, data: value[k] }; }), NAME_LABEL[section] || "name");
      }
      return kvTable(value);
    }
    return el("div", "value", value === null || value === undefined ? "-" : String(value));
  }
  function renderLastError(value) {
    var box = el("div", "lasterror");
    if (!isObj(value)) { box.appendChild(el("div", "message err", String(value))); return box; }
    var message = value.message || value.error || null;
    if (!message) { box.appendChild(el("div", "none", "no errors since the start")); return box; }
    box.appendChild(el("div", "message err", message));
    var at = value.at !== undefined ? value.at : (value.time !== undefined ? value.time : value.last_error_at);
    var d = asDate("last_error_at", at);
    if (d) { box.appendChild(el("div", "when", fmtAgo(d) + " (" + fmtAbs(d) + ")")); }
    return box;
  }
  function renderResources(value) {
    if (!isObj(value) || value.error) { return render("resources", value); }
    var warn = typeof value.warn_percent === "number" ? value.warn_percent : 70;
    var crit = typeof value.critical_percent === "number" ? value.critical_percent : 90;
    var t = el("table", "kv");
    ["cpu", "memory", "disk"].forEach(function (name) {
      var pct = value[name + "_percent"];
      if (typeof pct !== "number") { return; }
      var tr = el("tr"), td = el("td");
      tr.appendChild(el("th", null, name));
      td.appendChild(bar(pct, pct >= crit ? "bad" : pct >= warn ? "warn" : "ok"));
      tr.appendChild(td);
      t.appendChild(tr);
    });
    var foot = el("tr");
    foot.appendChild(el("th", null, "status"));
    foot.appendChild(cell("status", value.status));
    t.appendChild(foot);
    var limits = el("tr");
    limits.appendChild(el("th", null, "thresholds"));
    limits.appendChild(el("td", "muted", "warn " + warn + "%, critical " + crit + "%"));
    t.appendChild(limits);
    if (typeof value.source === "string") {
      // CPU and memory are percentages of these: the container's limits (cgroup) or the host's.
      var what = value.source;
      if (typeof value.cpu_limit_cores === "number") { what += ", " + (+value.cpu_limit_cores.toFixed(2)) + " CPU"; }
      var mem = value.memory_limit_bytes;
      if (typeof mem === "number") {
        what += ", " + (mem >= 1073741824 ? (+(mem / 1073741824).toFixed(1)) + " GB" : Math.round(mem / 1048576) + " MB") + " memory";
      }
      var measured = el("tr");
      measured.appendChild(el("th", null, "measured"));
      measured.appendChild(el("td", "muted", what));
      t.appendChild(measured);
    }
    return t;
  }
  var TRENDS = [["sent", "sent per minute", false], ["failed", "failed per minute", false],
                ["received", "received per minute", false], ["queue_depth", "queue depth", true],
                ["oldest_queued_age", "oldest queued age", true]];
  // The SVG comes from a <template> in the page, so the HTML parser gives it its namespace.
  function sparkline(values) {
    var w = 240, h = 30, pad = 2;
    var template = byId("spark-template");
    if (!template || !template.content) { return el("span", "muted", "-"); }
    var svg = template.content.firstElementChild.cloneNode(true);
    var proto = svg.querySelector("polyline");
    svg.removeChild(proto);
    var max = 0;
    values.forEach(function (v) { if (typeof v === "number" && v > max) { max = v; } });
    var step = values.length > 1 ? w / (values.length - 1) : w;
    // A minute without a reading (a level before the first one) breaks the line instead of drawing 0.
    var runs = [], run = [];
    values.forEach(function (v, i) {
      if (typeof v !== "number") { if (run.length) { runs.push(run); run = []; } return; }
      var y = h - pad - (max > 0 ? (h - 2 * pad) * v / max : 0);
      run.push((i * step).toFixed(1) + "," + y.toFixed(1));
    });
    if (run.length) { runs.push(run); }
    runs.forEach(function (points) {
      if (points.length === 1) { points.push((parseFloat(points[0]) + 1).toFixed(1) + "," + points[0].split(",")[1]); }
      var line = proto.cloneNode(false);
      line.setAttribute("points", points.join(" "));
      svg.appendChild(line);
    });
    return svg;
  }
  function renderTrends(value) {
    var series = isObj(value) && isObj(value.series) ? value.series : {};
    var t = el("table", "kv");
    TRENDS.forEach(function (spec) {
      var values = Array.isArray(series[spec[0]]) ? series[spec[0]] : [];
      var numbers = values.filter(function (v) { return typeof v === "number"; });
      var tr = el("tr"), graph = el("td", "trend");
      tr.id = "trend-" + spec[0];
      tr.appendChild(el("th", null, spec[1]));
      graph.appendChild(sparkline(values));
      tr.appendChild(graph);
      var last = numbers.length ? numbers[numbers.length - 1] : null;
      var peak = numbers.length ? Math.max.apply(null, numbers) : null;
      var fmt = spec[0] === "oldest_queued_age" ? function (v) { return fmtDuration(v); } : function (v) { return String(Math.round(v)); };
      var summary = !numbers.length ? "no data yet" : spec[2] ?
        "now " + fmt(last) + ", peak " + fmt(peak) :
        numbers.reduce(function (a, b) { return a + b; }, 0) + " in the last hour, peak " + peak + "/min";
      tr.appendChild(el("td", "muted", summary));
      t.appendChild(tr);
    });
    var foot = el("tr");
    foot.appendChild(el("th", null, "window"));
    foot.appendChild(el("td", "muted", "last 60 minutes, one point per minute, newest on the right"));
    t.appendChild(foot);
    return t;
  }
  function section(key, value) {
    var s = el("section");
    s.id = "section-" + key;
    var scalar = isScalar(value);
    if (scalar) { s.className = "stat"; }
    else if (WIDE.indexOf(key) >= 0) { s.className = "wide"; }
    s.appendChild(el("h2", null, title(key)));
    if (key === "last_error") { s.className = "wide"; s.appendChild(renderLastError(value)); }
    else if (key === "resources") { s.appendChild(renderResources(value)); }
    else if (key === "trends") { s.className = "wide"; s.appendChild(renderTrends(value)); }
    else { s.appendChild(render(key, value)); }
    return s;
  }
  function rowsOf(v) {
    if (Array.isArray(v)) { return v.filter(isObj).map(function (r, i) { return { name: String(r.name || r.label || r.id || i), data: r }; }); }
    if (isObj(v)) { return Object.keys(v).filter(function (k) { return isObj(v[k]); }).map(function (k) { return { name: k, data: v[k] }; }); }
    return [];
  }
  function overall(data) {
    var bad = [], warn = [];
    // An account that needs a login is a degraded bot while another still sends, and down when none does.
    var anyConnected = rowsOf(data.accounts).some(function (r) { return r.data.connected === true; });
    [["loops", "loop"], ["breakers", "breaker"], ["accounts", "account"], ["channels", "channel"]].forEach(function (pair) {
      rowsOf(data[pair[0]]).forEach(function (r) {
        if (pair[0] === "accounts" && r.data.state === "needs_login") {
          var line = "account " + r.name + " needs login" + (r.data.fix ? " (run: " + r.data.fix + ")" : "");
          if (anyConnected) { warn.push(line); } else { bad.push(line); }
          return;
        }
        var c = stateClass(r.data.state);
        if (c === "bad") { bad.push(pair[1] + " " + r.name + " " + r.data.state); }
        else if (c === "warn") { warn.push(pair[1] + " " + r.name + " " + r.data.state); }
      });
    });
    if (isObj(data.session_key) && data.session_key.status === "key_mismatch") {
      bad.push("key_mismatch: SESSION_ENCRYPTION_KEY cannot decrypt " + (data.session_key.accounts || []).join(", "));
    }
    if (isObj(data.resources) && data.resources.status) {
      var rc = stateClass(data.resources.status);
      if (rc === "bad") { bad.push("resources critical"); } else if (rc === "warn") { warn.push("resources high"); }
    }
    if (isObj(data.watchdog) && data.watchdog.healthy === false && !bad.length) { bad.push("watchdog unhealthy"); }
    if (isObj(data.heartbeat) && data.heartbeat.consecutive_failures > 0) { warn.push("heartbeat failing"); }
    if (data.stopping === true) { warn.push("stopping"); }
    if (isObj(data.starting)) { bad.push("waiting for " + data.starting.waiting_for); }
    if (bad.length) { return { cls: "bad", text: "trouble: " + bad.concat(warn).join(", ") }; }
    if (warn.length) { return { cls: "warn", text: "degraded: " + warn.join(", ") }; }
    return { cls: "ok", text: "all healthy" };
  }
  function update(data) {
    var serverTime = typeof data.time === "string" ? Date.parse(data.time) : NaN;
    skewMs = isNaN(serverTime) ? 0 : Date.now() - serverTime;
    byId("bot").textContent = data.bot || "bot";
    document.title = (data.bot || "bot") + " status";
    byId("version").textContent = data.version ? "version " + data.version : "";
    byId("uptime").textContent = typeof data.uptime_seconds === "number" ? "up " + fmtDuration(data.uptime_seconds) : "";
    byId("time").textContent = data.time ? "as of " + data.time : "";
    var backend = byId("backend");
    if (backend) { backend.textContent = data.backend ? "database " + data.backend : ""; }
    var sandbox = byId("sandbox");
    var world = isObj(data.sandbox_world) ? data.sandbox_world : null;
    sandbox.textContent = "SANDBOX MODE: not talking to real Telegram" +
      (world && world.directory ? " \u00b7 messages stay in the local world at " + world.directory : "");
    sandbox.classList.toggle("hidden", data.sandbox !== true);
    var starting = byId("starting");
    var waiting = isObj(data.starting) ? data.starting : null;
    starting.textContent = waiting ? "STARTING: waiting for " + waiting.waiting_for + " (attempt " + waiting.attempts +
      "): " + waiting.last_error + (waiting.fix ? " \u00b7 " + waiting.fix : "") : "";
    starting.classList.toggle("hidden", !waiting);
    var pill = byId("overall");
    if (pill) {
      var o = overall(data);
      pill.textContent = o.text;
      pill.className = "pill " + o.cls;
    }
    var keys = Object.keys(data).filter(function (k) { return HEADER_KEYS.indexOf(k) < 0; });
    keys.sort(function (a, b) {
      var ia = ORDER.indexOf(a), ib = ORDER.indexOf(b);
      return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || (a < b ? -1 : a > b ? 1 : 0);
    });
    var main = byId("sections");
    var fresh = document.createDocumentFragment();
    keys.forEach(function (k) { fresh.appendChild(section(k, data[k])); });
    main.replaceChildren(fresh);
  }
  function showError(text) {
    var box = byId("fetch-error");
    box.textContent = text;
    box.classList.toggle("hidden", !text);
  }
  function refresh() {
    var headers = { "Accept": "application/json" };
    if (token) { headers["Authorization"] = "Bearer " + token; }
    var ctrl = new AbortController();
    var timer = setTimeout(function () { ctrl.abort(); }, REFRESH_MS);
    fetch("status", { headers: headers, cache: "no-store", signal: ctrl.signal, credentials: "omit" })
      .then(function (r) {
        if (r.status === 401) { throw new Error("unauthorized: open this page with ?token=..."); }
        if (!r.ok) { throw new Error("/status answered " + r.status); }
        return r.json();
      })
      .then(function (data) { lastOk = Date.now(); update(data); showError(""); })
      .catch(function (err) {
        showError("Could not refresh: " + (err && err.message ? err.message : err) +
                  (lastOk ? " (showing data from " + fmtDuration((Date.now() - lastOk) / 1000) + " ago)" : ""));
      })
      .then(function () {
        clearTimeout(timer);
        byId("conn").textContent = lastOk ? "updated " + new Date(lastOk).toLocaleTimeString() + ", every " + (REFRESH_MS / 1000) + "s" : "no data yet";
        setTimeout(refresh, REFRESH_MS);
      });
  }
  refresh();
})();
