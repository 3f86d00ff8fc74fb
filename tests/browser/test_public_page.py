"""The public transparency page `/public` in headless Chromium: it renders each indicator per
kecamatan against its target, draws the trend chart (inline SVG), shows the Satu Data metadata and
links the open-data downloads, and never shows a small cell's value."""

from __future__ import annotations

import base64
import os
import urllib.request
from pathlib import Path

import psycopg
import pytest

from consumers.indicator_rows import UPSERT, row
from infra.indicators import load_catalogue
from stream_processors.indicators.compute import compute, person_fields, slim_event
from tests.browser.cdp import Browser, chromium_binary
from tests.helpers import wait_until
from tests.unit.test_indicators import JOMBANG, KALIWATES, complaint, known_events

DAY_MS = 86_400_000


def october_complaints() -> list[dict]:
    """Six complaints resolved in October in Kaliwates, all within 72 h: 100 % that month."""
    evs = []
    for i, hours in enumerate([5, 10, 20, 30, 40, 60]):
        for e in complaint(f"oct-{i}", KALIWATES, hours):
            evs.append({**e, "time": e["time"] - 31 * DAY_MS, "id": e["id"] + "-oct"})
    return evs


@pytest.fixture
def api(arus_env, spawn_arus, fresh_database_url):
    catalogue = load_catalogue()
    fields = person_fields(catalogue)
    events = [slim_event(e, fields) for e in known_events() + october_complaints()]
    results = compute(catalogue, events, min_persons=5)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(UPSERT, [row(r) for r in results])
    env = arus_env(database_url=fresh_database_url, create_topics=False)
    proc = spawn_arus("api", env=env)
    base = f"http://127.0.0.1:{env['ARUS_HTTP_PORT']}"

    def healthy() -> bool:
        with urllib.request.urlopen(base + "/healthz", timeout=2) as r:  # noqa: S310
            return r.status == 200

    wait_until(healthy, 60, interval=0.2, message="arus api answers /healthz")
    yield base
    assert proc.alive(), proc.log_tail()


@pytest.fixture
def browser():
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    b = Browser(binary)
    yield b
    b.close()


def test_public_page_renders_indicators_chart_metadata_and_hides_small_cells(api, browser):
    page = browser.new_page(f"{api}/public?id=pengaduan-selesai-dalam-sla")
    page.wait("document.body.dataset.ready === 'pengaduan-selesai-dalam-sla'", 30, "the page loaded the indicator")
    assert page.eval("document.getElementById('notice').hidden") is False
    assert "CONTOH" in page.eval("document.getElementById('notice').textContent")
    assert page.eval("document.querySelectorAll('#list button').length") == len(load_catalogue().indicators)

    shot = os.environ.get("ARUS_TEST_SCREENSHOTS")  # a directory: keep a picture of the page for review
    if shot:
        page.send("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 1500, "deviceScaleFactor": 1,
                                                         "mobile": False})
        png = page.send("Page.captureScreenshot", {"format": "png"})["data"]
        (Path(shot) / "public.png").write_bytes(base64.b64decode(png))

    # trend chart: kabupaten values of October (100 %) and November (62.5 %), the target line
    chart = page.eval("""(() => {
        const svg = document.querySelector('#chart svg#trend');
        const line = svg && svg.querySelector('polyline.series');
        return svg && {
            points: line ? line.getAttribute('points').trim().split(/\\s+/).length : 0,
            values: [...svg.querySelectorAll('circle.point')].map(c => Number(c.dataset.value)),
            labels: [...svg.querySelectorAll('circle.point')].map(c => c.dataset.period),
            target: !!svg.querySelector('line.target'),
            width: svg.getBoundingClientRect().width,
        };
    })()""")
    assert chart is not None, "no SVG chart"
    assert chart["points"] == 2 and chart["values"] == [100, 62.5] and chart["labels"] == ["2026-10", "2026-11"]
    assert chart["target"] and chart["width"] > 200

    # per kecamatan against the target: Kaliwates 66.67 % off track; Jombang (2 complaints) hidden
    rows = page.eval("""[...document.querySelectorAll('#table tbody tr')].map(tr => ({
        region: tr.dataset.region, cells: [...tr.cells].map(td => td.textContent),
        standing: tr.querySelector('[data-standing]') && tr.querySelector('[data-standing]').dataset.standing}))""")
    by_region = {r["region"]: r for r in rows}
    kal = by_region[KALIWATES]
    assert "66,67" in kal["cells"][3] and "persen" in kal["cells"][3] and kal["standing"] == "off_track"
    assert kal["cells"][2] == "2026-11" and "90" in kal["cells"][4]
    assert len(by_region) == 31  # every kecamatan is listed, those without values as such
    assert "belum ada data" in by_region["35.09.02"]["cells"][3]
    jom = by_region[JOMBANG]
    assert "disembunyikan" in jom["cells"][3] and not any(ch.isdigit() for ch in jom["cells"][3])
    assert jom["standing"] == ""

    # the trend of one kecamatan: Kaliwates 100 % in October, 66.67 % in November
    page.eval(f"(() => {{ const s = document.getElementById('region'); s.value = '{KALIWATES}';"
              " s.dispatchEvent(new Event('change')); })()")
    page.wait(f"document.body.dataset.trend === 'pengaduan-selesai-dalam-sla@{KALIWATES}'", 30, "kecamatan trend")
    values = page.eval("[...document.querySelectorAll('#trend circle.point')].map(c => Number(c.dataset.value))")
    assert values[0] == 100 and round(values[1], 2) == 66.67 and len(values) == 2
    # Jombang: its only period is a small cell: nothing drawn, the note says it is hidden
    page.eval(f"(() => {{ const s = document.getElementById('region'); s.value = '{JOMBANG}';"
              " s.dispatchEvent(new Event('change')); })()")
    page.wait(f"document.body.dataset.trend === 'pengaduan-selesai-dalam-sla@{JOMBANG}'", 30, "Jombang trend")
    assert page.eval("document.querySelectorAll('#trend circle.point').length") == 0
    assert "disembunyikan" in page.eval("document.getElementById('chart-note').textContent")

    # Satu Data metadata and the open-data downloads
    meta = page.eval("document.getElementById('meta').textContent")
    for text in ("Dinas Komunikasi dan Informatika", "persen", "bulanan", "placeholder", "WIB"):
        assert text in meta, text
    csv_href = page.eval("document.getElementById('dl-csv').getAttribute('href')")
    assert csv_href == "/v1/indicators/pengaduan-selesai-dalam-sla?format=csv"
    csv_text = page.eval(f"fetch({csv_href!r}).then(r => r.text())")
    jombang = next(line for line in csv_text.splitlines() if f",{JOMBANG}," in line)
    assert ",True," in jombang and ",50.0," not in jombang and ",1.0," not in jombang
    meta_json = page.eval("fetch(document.getElementById('dl-meta').href).then(r => r.json())")
    assert meta_json["owner_agency"].startswith("Dinas Komunikasi") and meta_json["frequency"] == "monthly"

    # another indicator by a real click (the region chosen for the trend stays: back to the kabupaten)
    page.eval("(() => { const s = document.getElementById('region'); s.value = '35.09';"
              " s.dispatchEvent(new Event('change')); })()")
    page.wait("document.body.dataset.trend === 'pengaduan-selesai-dalam-sla@35.09'", 30, "kabupaten trend")
    page.click("#list button[data-id='penerima-bantuan-per-pmks']")
    page.wait("document.body.dataset.ready === 'penerima-bantuan-per-pmks'", 30, "the second indicator loaded")
    series = page.eval("[...document.querySelectorAll('#trend polyline.series, #trend circle.point')]"
                       ".map(e => e.dataset.series || e.dataset.value)")
    assert "5" in series  # PMKS09: 5 persons at kabupaten level; PMKS01 (2 persons) hidden
    cells = page.eval("[...document.querySelectorAll('#table tbody tr')].map(tr => tr.textContent)")
    assert any("PMKS01" in c and "disembunyikan" in c for c in cells)
    assert any("PMKS09" in c and "5 orang" in c for c in cells)
