"use strict";
// Polls /admin/stats and renders it. Rates come from the difference between two polls.
// Every value is written with textContent: function names come from request paths.
(function () {
  const REFRESH_MS = 2000;
  let previous = null;

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function rate(now, before, seconds) {
    if (before === undefined || seconds <= 0) return null;
    return Math.max(0, (now - before) / seconds);
  }

  function fmtRate(value) {
    return value === null ? "–" : value.toFixed(value >= 10 ? 0 : 2);
  }

  function fmtCount(value) {
    return String(Math.round(value));
  }

  function both(now, before, seconds) {
    return fmtRate(rate(now, before, seconds)) + " · " + fmtCount(now);
  }

  function total(requests) {
    return Object.values(requests).reduce((a, b) => a + b, 0);
  }

  function breakerSummary(breakers) {
    if (breakers.length === 0) return "none yet";
    const counts = {};
    for (const b of breakers) counts[b.state] = (counts[b.state] || 0) + 1;
    return Object.entries(counts).map(([state, n]) => n + " " + state).join(", ");
  }

  function renderUpstreams(stats, seconds) {
    const body = document.querySelector("#upstreams tbody");
    body.replaceChildren();
    const names = Object.keys(stats.upstreams).sort();
    for (const name of names) {
      const u = stats.upstreams[name];
      const before = previous && previous.upstreams[name];
      const row = el("tr");
      row.dataset.upstream = name;
      row.append(el("td", name === "-" ? "(no route)" : name, "name"));
      row.append(el("td", u.dialect || ""));
      row.append(el("td", fmtRate(rate(total(u.requests), before && total(before.requests), seconds)), "num"));
      const classes = el("td", null, "classes");
      for (const cls of Object.keys(u.requests).sort()) {
        const was = before ? (before.requests[cls] || 0) : undefined;
        classes.append(el("span", cls + " " + both(u.requests[cls], was, seconds)));
      }
      row.append(classes);
      row.append(el("td", both(u.retries, before && before.retries, seconds), "num retries"));
      row.append(el("td", both(u.ratelimit_refused, before && before.ratelimit_refused, seconds), "num refusals"));
      row.append(el("td", breakerSummary(u.breakers)));
      body.append(row);
    }
  }

  function renderBreakers(stats) {
    const body = document.querySelector("#breakers tbody");
    body.replaceChildren();
    const all = [];
    for (const u of Object.values(stats.upstreams)) all.push(...u.breakers);
    all.sort((a, b) => (a.upstream + "/" + a.function).localeCompare(b.upstream + "/" + b.function));
    for (const b of all) {
      const row = el("tr");
      row.dataset.breaker = b.upstream + "/" + b.function;
      row.append(el("td", b.upstream));
      row.append(el("td", b.function === "*" ? "* (whole upstream)" : b.function));
      const state = el("td");
      state.append(el("span", b.state, "state state-" + b.state));
      row.append(state);
      row.append(el("td", b.failures + " / " + b.fail_max, "num"));
      row.append(el("td", b.state === "open" ? b.open_remaining_s.toFixed(1) + " s" : "–", "num left"));
      body.append(row);
    }
    document.getElementById("no-breakers").hidden = all.length > 0;
  }

  function renderMeta(stats) {
    document.getElementById("replica").textContent = stats.replica + " (pid " + stats.pid + ")";
    document.getElementById("config").textContent = stats.config;
    const redis = document.getElementById("redis");
    const r = stats.redis;
    if (!r.configured) {
      redis.textContent = "not configured (memory state)";
      redis.className = "badge none";
    } else if (r.healthy) {
      redis.textContent = "up (" + fmtCount(r.errors) + " errors)";
      redis.className = "badge ok";
    } else {
      redis.textContent = "DOWN – fallback " + r.mode + ", retry in " + r.cooldown_left_s.toFixed(1) + " s";
      redis.className = "badge down";
    }
    document.getElementById("updated").textContent = new Date(stats.now * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  async function refresh() {
    const error = document.getElementById("error");
    try {
      const response = await fetch("/admin/stats", { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) {
        window.location.reload();
        return;
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      const stats = await response.json();
      const seconds = previous ? stats.now - previous.now : 0;
      renderMeta(stats);
      renderUpstreams(stats, seconds);
      renderBreakers(stats);
      previous = stats;
      error.hidden = true;
      document.body.dataset.refreshed = String((Number(document.body.dataset.refreshed) || 0) + 1);
    } catch (problem) {
      error.textContent = "Could not refresh: " + problem.message;
      error.hidden = false;
    }
  }

  refresh();
  setInterval(refresh, REFRESH_MS);
})();
