"""The operator console in headless Chromium (Debian's package; no browser download), end to end
against a real `arus api` and PostgreSQL: two consoles open, an alert appears in both, an
acknowledgement made in one reaches the other within a second, filters, the status board, resolve,
and a reconnection after the API restarts that replays what was missed (Last-Event-ID).

Skipped, with a plain message, when no chromium binary is installed (`apt-get install chromium`;
.ci/run installs it)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.alert_helpers import add_event, add_operator, insert_alert
from tests.browser.cdp import Browser, Page, chromium_binary
from tests.helpers import pg_scalar, wait_until

CHROMIUM = chromium_binary()
pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not found: browser (console) test skipped "
                                                "(apt-get install chromium)"),
]


@pytest.fixture
def browser() -> Iterator[Browser]:
    assert CHROMIUM is not None
    b = Browser(CHROMIUM)
    try:
        yield b
    finally:
        b.close()


def _row(alert_id: str) -> str:
    return f"document.querySelector('tr[data-alert-id=\"{alert_id}\"]')"


def _state(page: Page, alert_id: str) -> str | None:
    value = page.eval(f"({_row(alert_id)} || {{}}).dataset?.state ?? null")
    return str(value) if value is not None else None


def _live(page: Page, timeout: float = 20) -> None:
    page.wait("document.getElementById('conn')?.dataset.state === 'live'", timeout, "console stream is live")


def test_two_consoles_ack_propagates_within_a_second(arus_env, spawn_arus, fresh_database_url, browser):
    dsn = fresh_database_url
    env = arus_env(database_url=dsn)
    api = spawn_arus("api", env=env)
    base = f"http://127.0.0.1:{env['ARUS_HTTP_PORT']}"
    wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 30, message="api answers")
    token1 = add_operator(env, "operator.satu")
    token2 = add_operator(env, "operator.dua")

    page1 = browser.new_page(f"{base}/")
    page2 = browser.new_page(f"{base}/")
    for page in (page1, page2):
        _live(page)
        assert page.eval("document.getElementById('clock').textContent").endswith("WIB")
        page.wait("document.querySelectorAll('#status-rows tr').length === 31", 15, "status board per kecamatan")

    # an open alert appears in both consoles, without reload
    alert_id = f"river-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    insert_alert(dsn, alert_id, severity="critical", entity="gauge-bedadung-01", kecamatan="35.09.19",
                 value=3.2, message="Bedadung 3.2 m")
    for page in (page1, page2):
        page.wait(f"{_row(alert_id)} !== null", 5, f"alert {alert_id} shown")
    appear_s = time.monotonic() - t0
    assert _state(page1, alert_id) == "open" and _state(page2, alert_id) == "open"
    assert page2.eval(f"{_row(alert_id)}.dataset.severity") == "critical"
    assert "Kaliwates" in page2.eval(f"{_row(alert_id)}.textContent")
    page1.wait("document.querySelector('#status-rows tr[data-code=\"35.09.19\"]').classList.contains('has-alerts')",
               15, "status board shows the active alert in Kaliwates (polled every 10 s)")

    # filters: kind and kecamatan hide it, "all" shows it again
    page2.eval("(() => { const s = document.getElementById('f-kind'); s.value = 'air_quality';"
               " s.dispatchEvent(new Event('change')); })()")
    assert page2.eval(f"{_row(alert_id)} === null")
    page2.eval("(() => { const s = document.getElementById('f-kind'); s.value = 'water_level';"
               " s.dispatchEvent(new Event('change')); })()")
    assert page2.eval(f"{_row(alert_id)} !== null")
    page2.eval("(() => { const s = document.getElementById('f-kecamatan'); s.value = '35.09.20';"
               " s.dispatchEvent(new Event('change')); })()")
    assert page2.eval(f"{_row(alert_id)} === null")
    page2.eval("(() => { for (const id of ['f-kecamatan', 'f-kind']) { const s = document.getElementById(id);"
               " s.value = ''; s.dispatchEvent(new Event('change')); } })()")
    assert page2.eval(f"{_row(alert_id)} !== null")

    # acknowledging without a token is refused in the page itself; then the operator enters it once
    page1.click(f"tr[data-alert-id='{alert_id}'] button.ack")
    page1.wait("document.getElementById('message').classList.contains('error')", 5, "asks for a token")
    page1.type_into("#token", token1)
    page1.click("#token-save")
    assert page1.eval("sessionStorage.getItem('arus.operatorToken')") == token1
    assert page2.eval("sessionStorage.getItem('arus.operatorToken')") is None  # per tab
    assert "operator.satu" in page1.eval("document.getElementById('operator').textContent")

    page1.click(f"tr[data-alert-id='{alert_id}'] button.ack")
    t_click = time.monotonic()
    page2.wait(f"({_row(alert_id)} || {{}}).dataset?.state === 'acknowledged'", 1.0,
               "the acknowledgement reaches the other console within 1 s")
    ack_s = time.monotonic() - t_click
    page1.wait(f"({_row(alert_id)} || {{}}).dataset?.state === 'acknowledged'", 1.0, "acknowledged in console 1")
    assert "operator.satu" in page2.eval(f"{_row(alert_id)}.textContent")
    assert pg_scalar(dsn, "SELECT acknowledged_by FROM alerts WHERE id = %s", [alert_id]) == "operator.satu"
    assert page2.eval(f"{_row(alert_id)}.querySelector('button.ack') === null")  # no second ack

    # escalation from the stream updates both in place
    add_event(dsn, alert_id, "updated", value=3.6)
    page2.wait(f"{_row(alert_id)}.textContent.includes('3.6')", 5, "value updated live")

    # a wrong token is refused with a message and changes nothing
    page2.type_into("#token", token2 + "x")
    page2.click("#token-save")
    page2.click(f"tr[data-alert-id='{alert_id}'] button.resolve")
    page2.wait("document.getElementById('message').textContent.includes('tidak valid')", 5, "invalid token")
    assert _state(page1, alert_id) == "acknowledged"
    # resolve from console 2 with its own token: gone from both
    page2.type_into("#token", token2)
    page2.click("#token-save")
    page2.click(f"tr[data-alert-id='{alert_id}'] button.resolve")
    for page in (page1, page2):
        page.wait(f"{_row(alert_id)} === null", 2, "resolved alert leaves the list")
    assert pg_scalar(dsn, "SELECT resolved_by FROM alerts WHERE id = %s", [alert_id]) == "operator.dua"

    # the API restarts; an alert opened meanwhile arrives through the browser's own reconnection
    api.stop()
    page1.wait("document.getElementById('conn').dataset.state === 'reconnecting'", 10, "console sees the outage")
    missed = f"river-{uuid.uuid4().hex[:8]}"
    insert_alert(dsn, missed, severity="major", kecamatan="35.09.20", region="35.09.20.1007")
    spawn_arus("api", env=env, name="api-again")
    for page in (page1, page2):
        page.wait(f"{_row(missed)} !== null", 30, "alert missed during the outage is replayed")
        _live(page)
    counts = [page.eval(f"document.querySelectorAll('tr[data-alert-id=\"{missed}\"]').length")
              for page in (page1, page2)]
    assert counts == [1, 1]
    print(json.dumps({"appear_s": round(appear_s, 3), "ack_propagation_s": round(ack_s, 3)}))
