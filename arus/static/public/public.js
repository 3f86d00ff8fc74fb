// The public transparency page: the indicator catalogue, each indicator per kecamatan against its
// target, a trend chart (inline SVG drawn here, no library, no CDN), Satu Data metadata and downloads.
// All text goes through textContent (never innerHTML with data).
"use strict";

const STANDING = {on_track: "Sesuai target", at_risk: "Berisiko", off_track: "Di bawah target"};
const FREQ = {hourly: "per jam", daily: "harian", weekly: "mingguan", monthly: "bulanan"};
const COLORS = ["#0b5563", "#d35400", "#8e44ad", "#27ae60", "#2c3e50", "#c0392b", "#16a085", "#7f8c8d"];
const SVGNS = "http://www.w3.org/2000/svg";
const KAB = "35.09";

let catalogue = null;
let kecamatan = [];  // [{code, name}] from /v1/regions
let current = null;  // the indicator shown

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function fmt(v, unit) {
  if (v === null || v === undefined) return "–";
  const n = Number(v);
  const s = Math.abs(n) >= 100 || Number.isInteger(n) ? n.toLocaleString("id-ID", {maximumFractionDigits: 1})
    : n.toLocaleString("id-ID", {maximumFractionDigits: 2});
  return unit ? `${s} ${unit}` : s;
}

function wib(iso) {
  if (!iso) return "–";
  return new Date(iso).toLocaleString("id-ID", {timeZone: "Asia/Jakarta", dateStyle: "medium", timeStyle: "short"}) + " WIB";
}

function badge(standing) {
  return el("span", {class: `badge ${standing || ""}`, "data-standing": standing || ""},
            standing ? STANDING[standing] : "–");
}

async function getJSON(url) {
  const r = await fetch(url, {headers: {Accept: "application/json"}});
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

function renderList() {
  const ul = document.getElementById("list");
  ul.replaceChildren();
  for (const ind of catalogue.indicators) {
    const b = el("button", {type: "button", "data-id": ind.id}, ind.name);
    const cur = (ind.current || []).find(c => c.region_code === KAB && c.standing);
    if (cur) b.append(" ", badge(cur.standing));
    b.addEventListener("click", () => select(ind.id));
    const li = el("li");
    li.append(b);
    ul.append(li);
  }
}

function renderMeta(ind) {
  const dl = document.getElementById("meta");
  dl.replaceChildren();
  const t = ind.target || {};
  const target = t.value === null || t.value === undefined ? "belum ditetapkan"
    : `${fmt(t.value, ind.unit)} (${t.direction === "higher" ? "lebih tinggi lebih baik" : "lebih rendah lebih baik"})`
      + (t.placeholder ? " — placeholder, belum resmi" : "");
  const rows = [
    ["Definisi", ind.definition], ["Janji kerja", ind.promise], ["Program", ind.program || "–"],
    ["Produsen data", ind.owner_agency], ["Walidata", ind.walidata], ["Satuan", ind.unit],
    ["Frekuensi", FREQ[ind.frequency] || ind.frequency], ["Target", target],
    ["Terakhir diperbarui", wib(ind.last_updated)],
  ];
  for (const [k, v] of rows) dl.append(el("dt", {}, k), el("dd", {}, v));
  document.getElementById("dl-csv").href = ind.links.csv;
  document.getElementById("dl-meta").href = ind.links.metadata;
  document.getElementById("privacy").textContent = ind.privacy && ind.privacy.small_cell_suppression
    ? `Indikator ini dihitung dari data pribadi: nilai dari kurang dari ${ind.privacy.min_persons} orang disembunyikan.`
    : "Indikator ini tidak memuat data pribadi.";
}

function renderChart(ind, values, regionName) {
  const box = document.getElementById("chart");
  box.replaceChildren();
  const W = 640, H = 280, L = 56, R = 16, T = 16, B = 48;
  const bySeries = new Map();
  for (const v of values) {
    if (!bySeries.has(v.indicator_id)) bySeries.set(v.indicator_id, []);
    bySeries.get(v.indicator_id).push(v);
  }
  const periods = [...new Set(values.map(v => v.period_start))].sort();
  const shown = values.filter(v => v.value !== null);
  const ys = shown.map(v => v.value);
  if (ind.target && ind.target.value !== null && ind.target.value !== undefined) ys.push(ind.target.value);
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", id: "trend",
                           "aria-label": `Tren ${ind.name}, ${regionName}`, "data-region": values.length ? values[0].region_code : ""});
  if (!periods.length || !ys.length) {
    root.append(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "Belum ada nilai yang dapat ditampilkan"));
    box.append(root);
    document.getElementById("chart-note").textContent = "";
    return;
  }
  let lo = Math.min(0, ...ys), hi = Math.max(...ys);
  if (hi === lo) hi = lo + 1;
  hi += (hi - lo) * 0.1;
  const x = i => periods.length === 1 ? L + (W - L - R) / 2 : L + i * (W - L - R) / (periods.length - 1);
  const y = v => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  for (let k = 0; k <= 4; k++) {
    const v = lo + (hi - lo) * k / 4;
    root.append(svg("line", {class: "grid-line", x1: L, x2: W - R, y1: y(v), y2: y(v)}),
                svg("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, fmt(v)));
  }
  root.append(svg("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}),
              svg("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  const step = Math.max(1, Math.ceil(periods.length / 8));
  periods.forEach((p, i) => {
    if (i % step) return;
    const lab = values.find(v => v.period_start === p).period_label;
    const anchor = periods.length === 1 ? "middle" : i === 0 ? "start" : i === periods.length - 1 ? "end" : "middle";
    root.append(svg("text", {x: x(i), y: H - B + 16, "text-anchor": anchor}, lab));
  });
  if (ind.target && ind.target.value !== null && ind.target.value !== undefined) {
    const ty = y(ind.target.value);
    root.append(svg("line", {class: "target", x1: L, x2: W - R, y1: ty, y2: ty}),
                svg("text", {x: W - R, y: ty - 4, "text-anchor": "end"}, `target ${fmt(ind.target.value)}`));
  }
  let c = 0;
  for (const [series, rows] of bySeries) {
    const color = COLORS[c++ % COLORS.length];
    const pts = rows.filter(r => r.value !== null)
      .map(r => [x(periods.indexOf(r.period_start)), y(r.value), r]);
    if (pts.length) {
      root.append(svg("polyline", {class: "series", stroke: color, "data-series": series,
                                   points: pts.map(p => `${p[0].toFixed(1)},${p[1].toFixed(1)}`).join(" ")}));
    }
    for (const [px, py, r] of pts) {
      const dot = svg("circle", {cx: px.toFixed(1), cy: py.toFixed(1), r: 3.5, fill: color, class: "point",
                                 "data-value": r.value, "data-period": r.period_label});
      dot.append(svg("title", {}, `${r.period_label}: ${fmt(r.value, ind.unit)}`));
      root.append(dot);
    }
  }
  box.append(root);
  const hidden = values.filter(v => v.suppressed).length;
  const names = [...bySeries.keys()].map(s => s.split(".")[1]).filter(Boolean);
  document.getElementById("chart-note").textContent =
    (names.length ? `Seri: ${names.join(", ")}. ` : "") +
    (hidden ? `${hidden} periode disembunyikan (sel kecil).` : "");
}

function renderTable(ind, values) {
  const tbody = document.querySelector("#table tbody");
  tbody.replaceChildren();
  const rows = values.filter(v => v.region_level === "kecamatan");
  const seen = new Set(rows.map(v => v.region_code));
  for (const k of kecamatan) {  // every kecamatan is listed, with or without a value
    if (!seen.has(k.code)) rows.push({region_code: k.code, region_name: k.name, missing: true});
  }
  rows.sort((a, b) => (a.region_name || a.region_code).localeCompare(b.region_name || b.region_code));
  if (!rows.length) {
    const tr = el("tr");
    tr.append(el("td", {colspan: 6, class: "small"}, "Belum ada nilai per kecamatan."));
    tbody.append(tr);
    return;
  }
  for (const v of rows) {
    if (v.missing) {
      const tr = el("tr", {"data-region": v.region_code, class: "missing"});
      tr.append(el("td", {}, `${v.region_name} (${v.region_code})`), el("td", {}, "–"), el("td", {}, "–"),
                el("td", {class: "small"}, "belum ada data"), el("td", {class: "num"}, fmt(ind.target.value, ind.unit)),
                el("td", {}, "–"));
      tbody.append(tr);
      continue;
    }
    const tr = el("tr", {"data-region": v.region_code, "data-series": v.indicator_id});
    const value = v.suppressed ? el("td", {class: "suppressed"}, "disembunyikan (sel kecil)")
      : el("td", {class: "num"}, fmt(v.value, ind.unit));
    tr.append(el("td", {}, `${v.region_name || v.region_code} (${v.region_code})`),
              el("td", {}, v.category || "–"), el("td", {}, v.period_label), value,
              el("td", {class: "num"}, fmt(v.target, ind.unit)));
    const st = el("td");
    st.append(badge(v.suppressed ? null : v.standing));
    tr.append(st);
    tbody.append(tr);
  }
}

async function select(id) {
  const ind = catalogue.indicators.find(i => i.id === id) || catalogue.indicators[0];
  if (!ind) return;
  history.replaceState(null, "", `?id=${encodeURIComponent(ind.id)}`);
  for (const b of document.querySelectorAll("#list button")) b.setAttribute("aria-current", String(b.dataset.id === ind.id));
  document.getElementById("title").textContent = ind.name;
  document.getElementById("promise").textContent = ind.promise;
  renderMeta(ind);
  current = ind;
  const enc = encodeURIComponent(ind.id);
  const [, latest] = await Promise.all([
    showTrend(),
    getJSON(`/v1/indicators/${enc}?level=kecamatan&latest=true`),
  ]);
  renderTable(ind, latest.values);
  document.body.dataset.ready = ind.id;
}

async function showTrend() {
  const ind = current;
  const sel = document.getElementById("region");
  const code = sel.value || KAB;
  const name = sel.options[sel.selectedIndex] ? sel.options[sel.selectedIndex].textContent : code;
  const trend = await getJSON(`/v1/indicators/${encodeURIComponent(ind.id)}?region=${encodeURIComponent(code)}`);
  if (ind !== current) return;  // another indicator was chosen meanwhile
  renderChart(ind, trend.values, name);
  document.body.dataset.trend = `${ind.id}@${code}`;
}

async function loadRegions() {
  try {
    const body = await getJSON("/v1/regions?level=kecamatan");
    kecamatan = body.regions.map(r => ({code: r.code, name: r.name}));
  } catch (err) {
    kecamatan = [];  // the table then lists the kecamatan that have values
  }
  const sel = document.getElementById("region");
  for (const k of kecamatan) sel.append(el("option", {value: k.code}, `Kec. ${k.name}`));
  sel.addEventListener("change", () => showTrend());
}

async function main() {
  try {
    catalogue = await getJSON("/v1/indicators");
    document.getElementById("k").textContent = catalogue.min_persons;
    if (catalogue.example) {
      const n = document.getElementById("notice");
      n.textContent = "CONTOH: " + (catalogue.notice || "katalog contoh; target masih placeholder.");
      n.hidden = false;
    }
    renderList();
    await loadRegions();
    const wanted = new URLSearchParams(location.search).get("id");
    await select(wanted || (catalogue.indicators[0] && catalogue.indicators[0].id));
  } catch (err) {
    document.getElementById("title").textContent = "Gagal memuat indikator";
    document.getElementById("promise").textContent = String(err);
    document.body.dataset.ready = "error";
  }
}

main();
