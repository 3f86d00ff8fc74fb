// Arus operator console: live alerts (SSE), acknowledge/resolve, status per kecamatan. No dependencies.
"use strict";
(function () {
  const SEVERITIES = ["info", "warning", "major", "critical"];
  const SEV_LABEL = { info: "Info", warning: "Waspada", major: "Siaga", critical: "Awas" };
  const STATE_LABEL = { open: ["Terbuka", "open"], acknowledged: ["Diakui", "acknowledged"], resolved: ["Selesai", "resolved"] };
  const TRANSITIONS = ["opened", "escalated", "deescalated", "updated", "acknowledged", "resolved", "reopened"];
  const KINDS = ["water_level", "rainfall", "air_quality", "traffic_flow", "streetlight", "waste_container", "noise"];
  const TOKEN_KEY = "arus.operatorToken";
  const $ = (id) => document.getElementById(id);

  const alerts = new Map(); // id -> {alert, seq}
  const kecamatanNames = new Map(); // code -> name
  let lastSeq = 0;
  let source = null;

  // ------------------------------------------------------------------ helpers
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k.startsWith("data-")) e.setAttribute(k, v);
      else e[k] = v;
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  const wibTime = (s) => (s ? s.slice(11, 19) : "-"); // "YYYY-MM-DD HH:MM:SS WIB" -> HH:MM:SS
  const wibDay = (s) => (s ? s.slice(0, 10) : "");
  function say(text, kind) {
    const m = $("message");
    m.textContent = text;
    m.className = "message " + (kind || "");
  }
  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
  function showOperator() {
    const t = token();
    const name = t.includes(".") ? t.slice(0, t.lastIndexOf(".")) : "";
    $("operator").textContent = "";
    if (t) $("operator").append("Operator: ", el("strong", {}, name || "?"));
    else $("operator").append("Belum ada token ", el("small", {}, "no operator token"));
    $("token-clear").hidden = !t;
  }

  // ------------------------------------------------------------------ the clock (WIB)
  const clockFmt = new Intl.DateTimeFormat("id-ID", { timeZone: "Asia/Jakarta", hour: "2-digit", minute: "2-digit",
    second: "2-digit", hour12: false });
  const dayFmt = new Intl.DateTimeFormat("id-ID", { timeZone: "Asia/Jakarta", weekday: "long", day: "numeric",
    month: "long" });
  function tick() {
    const now = new Date();
    $("clock").textContent = clockFmt.format(now).replace(/\./g, ":") + " WIB";
    $("clock").title = dayFmt.format(now);
  }

  // ------------------------------------------------------------------ alerts list
  function apply(alert, seq) {
    const cur = alerts.get(alert.id);
    if (cur && cur.seq > seq) return false; // an older event than what is shown
    if (alert.state === "resolved") alerts.delete(alert.id);
    else alerts.set(alert.id, { alert, seq });
    if (alert.kind && !KINDS.includes(alert.kind)) { KINDS.push(alert.kind); fillKinds(); }
    return true;
  }

  function visible() {
    const kec = $("f-kecamatan").value, kind = $("f-kind").value;
    return [...alerts.values()].map((x) => x.alert)
      .filter((a) => (!kec || a.kecamatan === kec) && (!kind || a.kind === kind))
      .sort((a, b) => SEVERITIES.indexOf(b.severity) - SEVERITIES.indexOf(a.severity)
        || (b.updated_at || "").localeCompare(a.updated_at || "") || a.id.localeCompare(b.id));
  }

  function render() {
    const rows = visible();
    const body = $("alert-rows");
    body.replaceChildren(...rows.map(row));
    $("alert-count").textContent = String(rows.length);
    $("empty").hidden = rows.length > 0;
  }

  function row(a) {
    const actions = el("td", { class: "actions" });
    if (a.state === "open") {
      actions.append(el("button", { class: "ack", type: "button", title: "Acknowledge", onclick: () => command(a.id, "ack") },
        "Akui ", el("small", {}, "ack")));
    }
    actions.append(el("button", { class: "resolve", type: "button", title: "Resolve", onclick: () => command(a.id, "resolve") },
      "Selesai ", el("small", {}, "resolve")));
    const kecName = a.kecamatan_name || kecamatanNames.get(a.kecamatan) || a.kecamatan || "-";
    const who = a.state === "acknowledged" && a.acknowledged_by ? el("span", { class: "msg" }, "oleh · by " + a.acknowledged_by) : null;
    const [stateId, stateEn] = STATE_LABEL[a.state] || [a.state, ""];
    return el("tr", { class: "alert", "data-alert-id": a.id, "data-state": a.state, "data-severity": a.severity },
      el("td", {}, el("span", { class: "sev sev-" + a.severity, title: a.severity }, SEV_LABEL[a.severity] || a.severity)),
      el("td", { class: "state state-" + a.state }, stateId + " ", el("small", {}, stateEn), who),
      el("td", { class: "nowrap" }, kecName),
      el("td", { class: "nowrap" }, a.entity, el("span", { class: "msg" }, [a.kind, a.metric].filter(Boolean).join(" · "))),
      el("td", { class: "value" }, a.value === null || a.value === undefined ? "-" : String(Math.round(a.value * 100) / 100)),
      el("td", { class: "rule" }, a.rule_id, a.message ? el("span", { class: "msg" }, a.message) : null),
      el("td", { class: "nowrap", title: "mulai · opened " + (a.opened_at_wib || "") },
        wibTime(a.updated_at_wib), el("span", { class: "msg" }, "mulai " + wibTime(a.opened_at_wib) + " · " + wibDay(a.opened_at_wib))),
      actions);
  }

  async function command(id, action) {
    const t = token();
    if (!t) { say("Masukkan token operator dulu (enter your operator token first).", "error"); $("token").focus(); return; }
    document.querySelectorAll(`tr[data-alert-id="${CSS.escape(id)}"] button`).forEach((b) => { b.disabled = true; });
    try {
      const resp = await fetch(`/v1/alerts/${encodeURIComponent(id)}/${action}`, {
        method: "POST", headers: { Authorization: "Bearer " + t, "Content-Type": "application/json" }, body: "{}",
      });
      const body = await resp.json().catch(() => ({}));
      if (resp.ok) {
        if (body.alert) apply(body.alert, body.event ? body.event.seq : 0);
        const verb = action === "ack" ? "diakui (acknowledged)" : "diselesaikan (resolved)";
        say(`Peringatan ${id} ${verb}.` + (body.warning ? " Catatan: " + body.warning : ""), "ok");
      } else if (resp.status === 401) {
        say("Token operator tidak valid (invalid operator token).", "error");
      } else if (resp.status === 403) {
        say("Operator ini sudah dicabut (operator revoked).", "error");
      } else if (resp.status === 409) {
        say(`Tidak bisa: ${body.detail || "status berubah"} (conflict).`, "error");
        refreshOne(id);
      } else if (resp.status === 404) {
        alerts.delete(id);
        say(`Peringatan ${id} tidak ditemukan (not found).`, "error");
      } else {
        say(`Gagal (${resp.status}): ${body.detail || ""}`, "error");
      }
    } catch (e) {
      say("Gagal menghubungi server (network error).", "error");
    }
    render();
  }

  async function refreshOne(id) {
    const resp = await fetch(`/v1/alerts/${encodeURIComponent(id)}`);
    if (resp.ok) {
      const body = await resp.json();
      const seq = body.events.length ? body.events[body.events.length - 1].seq : 0;
      apply(body.alert, seq);
      render();
    }
  }

  // ------------------------------------------------------------------ the live stream
  function setConn(state, text, en) {
    const c = $("conn");
    c.dataset.state = state;
    c.textContent = text + " ";
    c.append(el("small", {}, en));
  }

  function onEvent(ev) {
    let msg;
    try { msg = JSON.parse(ev.data); } catch (e) { return; }
    lastSeq = Math.max(lastSeq, msg.seq);
    if (msg.alert) { if (apply(msg.alert, msg.seq)) render(); }
    else refreshOne(msg.event.alert_id);
  }

  function openStream() {
    if (source) source.close();
    // The browser reconnects by itself and sends Last-Event-ID; the query parameter covers the
    // first connection (continue from the list we loaded) and a reconnection before any event.
    source = new EventSource(`/v1/alerts/stream?last_event_id=${lastSeq}`);
    source.onopen = () => setConn("live", "Langsung", "live");
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        setConn("reconnecting", "Terputus, mencoba lagi…", "reconnecting");
        setTimeout(start, 3000);
      } else {
        setConn("reconnecting", "Menyambung ulang…", "reconnecting");
      }
    };
    for (const t of TRANSITIONS) source.addEventListener(t, onEvent);
  }

  async function start() {
    try {
      const resp = await fetch("/v1/alerts?limit=1000");
      if (!resp.ok) throw new Error(String(resp.status));
      const body = await resp.json();
      alerts.clear();
      for (const a of body.alerts) alerts.set(a.id, { alert: a, seq: 0 });
      lastSeq = body.last_seq;
      render();
      openStream();
    } catch (e) {
      setConn("reconnecting", "Server tidak terjangkau, mencoba lagi…", "server unreachable");
      setTimeout(start, 3000);
    }
  }

  // ------------------------------------------------------------------ filters and the status board
  function fillKinds() {
    const sel = $("f-kind"), keep = sel.value;
    sel.replaceChildren(el("option", { value: "" }, "Semua · all"), ...KINDS.map((k) => el("option", { value: k }, k)));
    sel.value = keep;
  }

  async function loadStatus() {
    try {
      const resp = await fetch("/v1/status/kecamatan");
      if (!resp.ok) throw new Error(String(resp.status));
      const body = await resp.json();
      const sel = $("f-kecamatan");
      if (kecamatanNames.size === 0) {
        for (const k of body.kecamatan) kecamatanNames.set(k.code, k.name);
        const keep = sel.value;
        sel.replaceChildren(el("option", { value: "" }, "Semua · all"),
          ...body.kecamatan.map((k) => el("option", { value: k.code }, `${k.name} (${k.code})`)));
        sel.value = keep;
        render();
      }
      $("status-rows").replaceChildren(...body.kecamatan.map((k) => el("tr",
        { "data-code": k.code, class: k.active_alerts ? "has-alerts" : "" },
        el("td", {}, k.code), el("td", {}, k.name),
        el("td", {}, el("span", { class: "dot" + (k.worst_severity ? " sev-" + k.worst_severity : "") }), String(k.active_alerts)),
        el("td", {}, `${k.devices_online}/${k.devices}`),
        el("td", {}, k.readings.toLocaleString("id-ID")),
        el("td", {}, k.latest_window_wib || "-"))));
      const dead = Object.entries(body.dead_letters_last_hour);
      $("dead").replaceChildren(...(dead.length ? dead.map(([r, n]) => el("li", {}, `${r}: ${n}`))
        : [el("li", {}, "tidak ada · none")]));
      $("status-updated").textContent = "diperbarui " + body.generated_at_wib;
    } catch (e) {
      $("status-updated").textContent = "status tidak tersedia (unavailable)";
    }
  }

  // ------------------------------------------------------------------ wiring
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const t = $("token").value.trim();
    if (t) sessionStorage.setItem(TOKEN_KEY, t);
    $("token").value = "";
    showOperator();
    say(t ? "Token disimpan untuk sesi ini (saved for this session)." : "", "ok");
  });
  $("token-clear").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); showOperator(); });
  $("f-kecamatan").addEventListener("change", render);
  $("f-kind").addEventListener("change", render);

  fillKinds();
  showOperator();
  tick();
  setInterval(tick, 1000);
  loadStatus();
  setInterval(loadStatus, 10000);
  start();
})();
