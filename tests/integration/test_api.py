"""The API process: health, metrics and the per-kecamatan status page, over real HTTP."""

import httpx

from tests.helpers import wait_until


def test_api_health_metrics_and_status_page(arus_env, spawn_arus):
    env = arus_env()
    api = spawn_arus("api", env=env)
    base = f"http://127.0.0.1:{env['ARUS_HTTP_PORT']}"
    health = wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).json(), 30, message="api answers")
    assert health == {"status": "ok", "database": "ok"}
    assert "arus_api_requests_total" in httpx.get(f"{base}/metrics").text
    page = httpx.get(f"{base}/")  # the operator console; its status board polls /v1/status/kecamatan
    assert page.status_code == 200 and "Konsol Operator" in page.text and "/static/console.js" in page.text
    assert "EventSource" in httpx.get(f"{base}/static/console.js").text
    board = httpx.get(f"{base}/v1/status/kecamatan").json()["kecamatan"]
    assert len(board) == 31 and "Kaliwates" in {k["name"] for k in board}
    assert httpx.get(f"{base}/openapi.json").json()["info"]["title"] == "Arus API"
    assert api.alive()
