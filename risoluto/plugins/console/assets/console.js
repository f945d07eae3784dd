// The Risoluto operator console. A plain client of the public /api/v1 routes: it sends the
// browser's own credentials (loopback needs none; from afar, the HttpOnly session cookie the
// sign-in set). It never sees a token, never stores anything, never asks for a secret value.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const esc = (v) => String(v === null || v === undefined ? "" : v).replace(/[&<>"']/g, (c) => ESC[c]);
  const canWrite = () => document.body.dataset.writes === "yes";
  const PAGE = 50;

  // --- talking to the API ------------------------------------------------------------------
  async function call(method, url, body) {
    const init = { method, credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    if (response.status === 401 && document.body.dataset.principal === "session") {
      notice("Your session has ended (signed out, expired, or the token changed). Reload the page to sign in again.");
    }
    return response;
  }

  async function errorText(response) {
    try {
      const data = await response.json();
      if (data && data.error) return `${data.error.message} (${response.status} ${data.error.code})`;
    } catch (_) { /* not JSON */ }
    return `HTTP ${response.status}`;
  }

  function notice(text, ok) {
    const el = $("notice");
    el.textContent = text;
    el.className = ok ? "ok" : "error";
    el.hidden = !text;
  }

  // Run fn now and every ms (never two at once); resolves when the first run is done. A hidden
  // tab does not poll (it would spend the api rate-limit bucket this client shares with the
  // operator's other tools) and catches up as soon as it is shown again.
  function poll(fn, ms) {
    let busy = false;
    const run = async () => {
      if (busy) return;
      busy = true;
      try { await fn(); } catch (err) { console.error(err); } finally { busy = false; }
    };
    setInterval(() => { if (!document.hidden) run(); }, ms);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) run(); });
    return run();
  }

  // Replace a tbody only when what it shows changed: polling must not reset a selection.
  function fill(id, rowsHtml) {
    const el = $(id);
    if (el.dataset.shown !== rowsHtml) {
      el.innerHTML = rowsHtml;
      el.dataset.shown = rowsHtml;
    }
  }

  function ago(iso) {
    const t = Date.parse(iso);
    if (!iso || Number.isNaN(t)) return "";
    let s = Math.max(0, Math.round((Date.now() - t) / 1000));
    if (s < 90) return `${s} s`;
    s = Math.round(s / 60);
    if (s < 90) return `${s} min`;
    return `${(s / 60).toFixed(1)} h`;
  }

  // Local time of day, HH:MM:SS (plain arithmetic: the Intl formatters cost a lot on first use).
  const two = (n) => String(n).padStart(2, "0");
  function clock(iso) {
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? esc(iso) : `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
  }
  // A sandbox reference in a narrow column: whole when short, else its start (all of it on hover).
  const short = (v) => {
    const text = String(v === null || v === undefined ? "" : v);
    return `<code title="${esc(text)}">${esc(text.length > 24 ? `${text.slice(0, 23)}…` : text)}</code>`;
  };
  const byText = (a, b) => (a < b ? -1 : a > b ? 1 : 0);

  function pager(id, page, pages, total, onPage) {
    const el = $(id);
    el.innerHTML = pages <= 1 ? `${total} shown` :
      `<button type="button" data-p="${page - 1}" ${page <= 0 ? "disabled" : ""}>‹ newer</button> ` +
      `page ${page + 1} of ${pages} (${total}) ` +
      `<button type="button" data-p="${page + 1}" ${page >= pages - 1 ? "disabled" : ""}>older ›</button>`;
    el.onclick = (e) => { const p = e.target.dataset && e.target.dataset.p; if (p !== undefined) onPage(Number(p)); };
  }

  // --- access line ---------------------------------------------------------------------------
  function access() {
    const { principal, writes } = document.body.dataset;
    const parts = [];
    if (principal === "loopback") parts.push("On this machine (loopback).");
    if (principal === "session") parts.push("Signed in.");
    if (writes === "no") parts.push("Read-only from this browser.");
    let html = `<span>${esc(parts.join(" "))}</span>`;
    if (writes === "sign-in") {
      html += ' <form method="post" action="/console/session" autocomplete="off" class="inline">' +
        '<label>Changes need the write token: <input name="token" type="password" autocomplete="off" required></label> ' +
        '<button type="submit">Sign in</button></form>';
    }
    if (principal === "session") {
      html += ' <form method="post" action="/console/session/end" class="inline"><button type="submit">Sign out</button></form>';
    }
    $("access").innerHTML = html + '<p id="notice" role="status" hidden></p>';
  }

  // --- checklist -------------------------------------------------------------------------------
  const ORDER = { FAIL: 0, WARN: 1, PASS: 2 };
  async function checklist() {
    const r = await call("GET", "/api/v1/hardening");
    if (!r.ok) { $("checklist-summary").textContent = await errorText(r); return; }
    const data = await r.json();
    const items = data.items.slice().sort((a, b) => (ORDER[a.status] - ORDER[b.status]) || byText(a.item, b.item));
    fill("checklist-rows", items.map((i) =>
      `<tr class="st-${esc(i.status)}"><td><span class="badge">${esc(i.status)}</span></td><td>${esc(i.item)}</td>` +
      `<td>${esc(i.reason)}</td><td>${i.status === "PASS" ? "" : esc(i.fix)}</td></tr>`).join(""));
    const c = data.counts;
    $("checklist-summary").textContent = `${c.FAIL} fail · ${c.WARN} warn · ${c.PASS} pass`;
    $("checklist-summary").className = `summary st-${data.status}`;
  }

  // --- sandboxes -------------------------------------------------------------------------------
  let sandboxes = [];
  let sandboxPage = 0;
  async function loadSandboxes() {
    const r = await call("GET", "/api/v1/sandboxes");
    if (!r.ok) { $("sandboxes-summary").textContent = await errorText(r); sandboxes = []; renderSandboxes(); return; }
    sandboxes = (await r.json()).sandboxes || [];
    sandboxes.sort((a, b) => byText(String(b.created_at || ""), String(a.created_at || "")));
    const running = sandboxes.filter((s) => s.status === "running").length;
    $("sandboxes-summary").textContent = `${sandboxes.length} known · ${running} running`;
    renderSandboxes();
  }

  function exitText(s) {
    if (s.oom_killed) return '<span class="bad">OOM killed</span>';
    if (s.timed_out) return '<span class="bad">timed out</span>';
    return s.exit_code === null || s.exit_code === undefined ? "" : esc(s.exit_code);
  }

  function renderSandboxes() {
    const q = $("sandboxes-filter").value.trim().toLowerCase();
    const shown = q ? sandboxes.filter((s) => `${s.issue} ${s.status}`.toLowerCase().includes(q)) : sandboxes;
    const pages = Math.max(1, Math.ceil(shown.length / PAGE));
    sandboxPage = Math.min(sandboxPage, pages - 1);
    const rows = shown.slice(sandboxPage * PAGE, (sandboxPage + 1) * PAGE).map((s) => {
      const live = !s.removed && s.status !== "removed";
      const digest = String(s.policy_digest || "");
      return `<tr data-id="${esc(s.id)}" class="sb-${esc(s.status)}"><td>${esc(s.issue)}</td><td>${esc(s.status)}</td>` +
        `<td>${ago(s.started_at || s.created_at)}</td><td><code title="${esc(digest)}">${esc(digest.slice(0, 19))}</code></td>` +
        `<td>${exitText(s)}</td><td><code>${esc(s.name)}</code></td>` +
        `<td>${live ? `<button type="button" class="stop" data-id="${esc(s.id)}" ${canWrite() ? "" : "disabled"}>Stop</button>` : ""}</td></tr>`;
    });
    fill("sandboxes-rows", rows.join(""));
    pager("sandboxes-pager", sandboxPage, pages, shown.length, (p) => { sandboxPage = p; renderSandboxes(); });
  }

  async function stopSandbox(id, button) {
    button.disabled = true;
    button.textContent = "Stopping…";
    const r = await call("DELETE", `/api/v1/sandboxes/${encodeURIComponent(id)}`);
    if (!r.ok) notice(`Stop failed: ${await errorText(r)}`);
    await loadSandboxes();
  }

  // --- egress ----------------------------------------------------------------------------------
  const MAX_DECISIONS = 10000;
  let decisions = [];
  let decisionPage = 0;
  let approvals = [];
  let egressOff = false;
  let renderQueued = false;

  function listOf(data, key) {
    if (Array.isArray(data)) return data;
    return (data && (data[key] || data.items)) || [];
  }

  function egressUnavailable() {
    egressOff = true;
    $("egress-unavailable").hidden = false;
    $("egress-live").hidden = true;
    $("egress-summary").textContent = "";
  }

  // A decision's identity, to merge what the stream pushed with what a later fetch returns.
  const keyOf = (d) => [d.at, d.sandbox, d.host, d.port, d.method, d.path, d.verdict, d.reason].join("|");
  let streamed = []; // pushed since the page opened, newest first

  async function fetchDecisions(limit) {
    const r = await call("GET", `/api/v1/egress/decisions?limit=${limit}`);
    if (r.status === 404) { egressUnavailable(); return false; }
    if (!r.ok) { $("egress-summary").textContent = await errorText(r); return false; }
    const fetched = listOf(await r.json(), "decisions");
    const known = new Set(fetched.map(keyOf));
    decisions = streamed.filter((d) => !known.has(keyOf(d))).concat(fetched).slice(0, MAX_DECISIONS);
    return true;
  }

  function openStream() {
    const stream = new EventSource("/api/v1/egress/decisions/stream");
    const onEvent = (e) => {
      let d;
      try { d = JSON.parse(e.data); } catch (_) { return; }
      if (d && typeof d.decision === "object" && d.decision !== null) d = d.decision;
      if (!d || typeof d !== "object" || !("verdict" in d)) return;
      streamed.unshift(d);
      if (streamed.length > MAX_DECISIONS) streamed.length = MAX_DECISIONS;
      decisions.unshift(d);
      if (decisions.length > MAX_DECISIONS) decisions.length = MAX_DECISIONS;
      queueDecisions();
    };
    stream.onmessage = onEvent;
    stream.addEventListener("decision", onEvent);
  }

  // First the newest 100 (the first page, quickly), then the stream, then up to 1000 more: the
  // later fetch also covers anything decided between the first fetch and the stream opening.
  async function egressStart() {
    if (!(await fetchDecisions(100))) return;
    $("egress-live").hidden = false;
    renderDecisions();
    openStream();
    poll(loadApprovals, 3000);
  }

  async function egressBackfill() {
    if (!egressOff && !$("egress-live").hidden && (await fetchDecisions(1000))) queueDecisions();
  }

  function queueDecisions() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => { renderQueued = false; renderDecisions(); });
  }

  function renderDecisions() {
    const denyOnly = $("egress-deny-only").checked;
    const shown = denyOnly ? decisions.filter((d) => d.verdict !== "allow") : decisions;
    const pages = Math.max(1, Math.ceil(shown.length / PAGE));
    decisionPage = Math.min(decisionPage, pages - 1);
    const rows = shown.slice(decisionPage * PAGE, (decisionPage + 1) * PAGE).map((d) => {
      const refused = d.verdict === "deny";
      const dest = `${esc(d.host)}${d.port ? `:${esc(d.port)}` : ""}${d.sni && d.sni !== d.host ? ` <small>sni ${esc(d.sni)}</small>` : ""}`;
      const req = d.method ? `${esc(d.method)} ${esc(d.path)}` : "";
      return `<tr class="v-${esc(d.verdict)}"><td>${clock(d.at)}</td>` +
        `<td><span class="badge">${refused ? "REFUSED" : esc(String(d.verdict).toUpperCase())}</span></td>` +
        `<td>${short(d.sandbox)}</td><td>${esc(d.issue)}</td><td>${dest}</td><td>${req}</td>` +
        `<td>${esc(d.reason)}</td><td>${esc(d.rule)}</td><td>${esc(d.credential)}</td>` +
        `<td>${esc(d.bytes_up ?? "")}/${esc(d.bytes_down ?? "")}</td></tr>`;
    });
    fill("decisions-rows", rows.join(""));
    const refusals = decisions.filter((d) => d.verdict === "deny").length;
    $("egress-summary").textContent = `${decisions.length} decisions loaded · ${refusals} refused · ${approvals.length} waiting`;
    pager("egress-pager", decisionPage, pages, shown.length, (p) => { decisionPage = p; renderDecisions(); });
  }

  async function loadApprovals() {
    if (egressOff) return;
    const r = await call("GET", "/api/v1/egress/approvals");
    if (r.status === 404) { egressUnavailable(); return; }
    if (!r.ok) return;
    approvals = listOf(await r.json(), "approvals");
    renderApprovals();
    queueDecisions();
  }

  function timeLeft(a) {
    const left = Math.round((Date.parse(a.expires_at) - Date.now()) / 1000);
    return Number.isNaN(left) ? "" : left > 0 ? `${left} s` : "expired";
  }

  function renderApprovals() {
    const dis = canWrite() ? "" : "disabled";
    fill("approvals-rows", approvals.length === 0 ? '<tr><td colspan="5" class="none">nothing is waiting</td></tr>' :
      approvals.map((a) => `<tr data-id="${esc(a.id)}"><td>${short(a.sandbox)}</td>` +
        `<td>${esc(a.issue)}</td><td>${esc(a.host)}:${esc(a.port)}</td><td class="left" data-expires="${esc(a.expires_at)}">${timeLeft(a)}</td>` +
        `<td><button type="button" class="approve" data-id="${esc(a.id)}" data-decision="allow-once" ${dis}>Allow once</button> ` +
        `<button type="button" class="approve" data-id="${esc(a.id)}" data-decision="allow-issue" ${dis}>Allow for the issue</button> ` +
        `<button type="button" class="approve deny" data-id="${esc(a.id)}" data-decision="deny" ${dis}>Deny</button></td></tr>`).join(""));
  }

  function tickApprovals() {
    for (const cell of document.querySelectorAll("#approvals-rows td.left")) {
      cell.textContent = timeLeft({ expires_at: cell.dataset.expires });
    }
  }

  async function answer(id, decision, button) {
    button.disabled = true;
    const r = await call("POST", `/api/v1/egress/approvals/${encodeURIComponent(id)}`, { decision });
    if (!r.ok) notice(`Answer failed: ${await errorText(r)}`);
    await loadApprovals();
  }

  // --- secrets ---------------------------------------------------------------------------------
  async function loadSecrets() {
    const r = await call("GET", "/api/v1/secrets");
    if (!r.ok) { $("secrets-summary").textContent = await errorText(r); fill("secrets-rows", ""); return; }
    const keys = (await r.json()).keys || [];
    $("secrets-summary").textContent = `${keys.length} stored`;
    const dis = canWrite() ? "" : "disabled";
    fill("secrets-rows", keys.map((k) => `<tr><td><code>${esc(k)}</code></td>` +
      `<td><button type="button" class="delete-secret" data-name="${esc(k)}" ${dis}>Delete</button></td></tr>`).join(""));
  }

  async function setSecret(event) {
    event.preventDefault();
    const name = $("secret-name").value.trim();
    const field = $("secret-value");
    const value = field.value;
    field.value = ""; // the value leaves the page with this request and is not kept
    const r = await call("PUT", `/api/v1/secrets/${encodeURIComponent(name)}`, { value });
    $("secret-status").textContent = r.ok ? `${name} set` : await errorText(r);
    await Promise.all([loadSecrets(), loadAudit()]);
  }

  async function deleteSecret(name) {
    const r = await call("DELETE", `/api/v1/secrets/${encodeURIComponent(name)}`);
    $("secret-status").textContent = r.ok ? `${name} deleted` : await errorText(r);
    await Promise.all([loadSecrets(), loadAudit()]);
  }

  // --- audit -----------------------------------------------------------------------------------
  async function loadAudit() {
    const [w, s] = await Promise.all([call("GET", "/api/v1/audit?log=write&limit=50"),
      call("GET", "/api/v1/audit?log=secrets&limit=50")]);
    if (w.ok) {
      fill("audit-write-rows", (await w.json()).items.map((e) =>
        `<tr><td>${clock(e.at)}</td><td>${esc(e.principal)} <small>${esc(e.remote)}</small></td>` +
        `<td>${esc(e.method)} <code>${esc(e.path)}</code></td><td>${esc(e.status)}</td></tr>`).join(""));
    }
    if (s.ok) {
      fill("audit-secrets-rows", (await s.json()).items.map((e) =>
        `<tr><td>${clock(e.at)}</td><td>${esc(e.principal)} <small>${esc(e.remote)}</small></td>` +
        `<td>${esc(e.operation)} <code>${esc(e.key)}</code></td></tr>`).join(""));
    }
  }

  // --- traffic chart ---------------------------------------------------------------------------
  const SERIES = [["requests", "requests", "c-req"], ["rate_limited", "429s", "c-429"], ["egress", "egress decisions", "c-egress"]];
  async function loadChart() {
    const r = await call("GET", "/api/v1/stats/series");
    if (!r.ok) { $("chart").textContent = await errorText(r); return; }
    const data = await r.json();
    const W = 760, H = 220, L = 44, B = 24, T = 10, R = 10;
    const n = data.requests.length;
    const present = SERIES.filter(([key]) => Array.isArray(data[key]));
    const max = Math.max(1, ...present.flatMap(([key]) => data[key]));
    const x = (i) => L + (i * (W - L - R)) / (n - 1);
    const y = (v) => T + (H - T - B) * (1 - v / max);
    let svg = `<svg viewBox="0 0 ${W} ${H}" width="100%" role="img" aria-label="requests, 429s and egress decisions per minute">`;
    for (const f of [0, 0.5, 1]) {
      svg += `<line class="grid" x1="${L}" x2="${W - R}" y1="${y(max * f)}" y2="${y(max * f)}"/>` +
        `<text class="axis" x="${L - 4}" y="${y(max * f) + 4}" text-anchor="end">${Math.round(max * f)}</text>`;
    }
    for (const [i, label] of [[0, "−60 min"], [30, "−30 min"], [n - 1, "now"]]) {
      svg += `<text class="axis" x="${x(i)}" y="${H - 6}" text-anchor="middle">${label}</text>`;
    }
    for (const [key, , cls] of present) {
      svg += `<polyline class="${cls}" fill="none" points="${data[key].map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ")}"/>`;
    }
    svg += "</svg>";
    const legend = SERIES.map(([key, label, cls]) => Array.isArray(data[key])
      ? `<span class="${cls}">■</span> ${label}: ${data[key].reduce((a, b) => a + b, 0)}`
      : `<span class="${cls}">■</span> ${label}: not recorded on this server`).join(" · ");
    const html = svg + `<p class="legend">${legend} (per minute; totals over the hour)</p>`;
    if ($("chart").dataset.shown !== html) { $("chart").innerHTML = html; $("chart").dataset.shown = html; }
  }

  // --- wiring ----------------------------------------------------------------------------------
  function start() {
    access();
    $("sandboxes-filter").addEventListener("input", () => { sandboxPage = 0; renderSandboxes(); });
    $("egress-deny-only").addEventListener("change", () => { decisionPage = 0; renderDecisions(); });
    $("secret-form").addEventListener("submit", setSecret);
    for (const el of document.querySelectorAll("#secret-form input, #secret-form button")) el.disabled = !canWrite();
    document.addEventListener("click", (e) => {
      const t = e.target;
      if (!(t instanceof HTMLButtonElement)) return;
      if (t.classList.contains("stop")) stopSandbox(t.dataset.id, t);
      else if (t.classList.contains("approve")) answer(t.dataset.id, t.dataset.decision, t);
      else if (t.classList.contains("delete-secret")) deleteSecret(t.dataset.name);
    });
    // What the operator looks at first is asked first; the rest waits until it has arrived, so
    // the server (and the browser's six connections) work on the checklist and the lists first.
    const first = [poll(checklist, 5000), poll(loadSandboxes, 5000), egressStart().catch((err) => console.error(err))];
    Promise.allSettled(first).then(() => {
      egressBackfill().catch((err) => console.error(err));
      poll(loadSecrets, 30000);
      poll(loadAudit, 15000);
      poll(loadChart, 30000);
    });
    setInterval(tickApprovals, 1000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
