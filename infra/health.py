"""The operations endpoint of a background service (gateway, worker, sink): /metrics, /healthz, /readyz.

One small threaded HTTP server per process on the service's metrics port. /healthz answers 200 while
the process serves requests (liveness); /readyz asks the service whether it does its job now
(connected, partitions assigned) and answers 200 or 503 with the reasons as JSON, so an orchestrator
routes nothing to, and an operator sees why, a service that is up but not ready.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

# () -> (ready, details); details are shown as JSON
ReadyCheck = Callable[[], tuple[bool, dict[str, object]]]


def _always_ready() -> tuple[bool, dict[str, object]]:
    return True, {}


def serve_health(port: int, registry: CollectorRegistry, service: str,
                 ready: ReadyCheck = _always_ready, host: str = "0.0.0.0") -> ThreadingHTTPServer:  # noqa: S104
    """Start the endpoint in a daemon thread; returns the server (call shutdown() to stop it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._json(200, {"service": service, "status": "ok"})
            elif path == "/readyz":
                try:
                    ok, details = ready()
                except Exception as exc:  # noqa: BLE001 - a failing check means not ready
                    ok, details = False, {"error": str(exc)}
                self._json(200 if ok else 503, {"service": service, "ready": ok, **details})
            else:
                self._json(404, {"error": f"unknown path {path}; try /metrics, /healthz, /readyz"})

        def _json(self, code: int, body: dict[str, object]) -> None:
            self._send(code, json.dumps(body, default=str).encode(), "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not news
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"{service}-health", daemon=True).start()
    return server
