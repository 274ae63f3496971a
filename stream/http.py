"""The sink's read-only HTTP server: the live page and its event stream, point details,
map images, status, metrics, files."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from liveindex.models.errors import TransportError

log = logging.getLogger(__name__)

PAGE = resources.files("liveindex.stream").joinpath("web/index.html")
EVENT_SECONDS = 0.25  # the page updates at 4 Hz
IDLE_SECONDS = 30.0


class LiveHttpServer:
    """Serves what ``provider`` offers; GET only, nothing on the server can be changed."""

    def __init__(self, provider, *, host: str = "127.0.0.1", port: int = 8080):
        handler = type("Handler", (_Handler,), {"provider": provider})
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise TransportError(f"cannot serve http on {host}:{port} ({exc.strerror}); choose another --http-port") from None
        self.server.daemon_threads = True
        self.closing = threading.Event()  # ends the event streams
        handler.closing = self.closing
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> "LiveHttpServer":
        self.thread.start()
        log.info("live display on %s (metrics at %smetrics)", self.url, self.url)
        return self

    def stop(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    provider = None  # set per server: the sink's view (stream/live_view.SinkView)
    closing = None
    # A connection that sends nothing (or stops reading an event stream) is closed after this
    # long: each holds a thread.
    timeout = IDLE_SECONDS

    def log_message(self, fmt, *args):  # keep the operator's console for pipeline news
        log.debug("http: " + fmt, *args)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        url = urlparse(self.path)
        path = url.path
        try:
            if path in ("/", "/index.html"):
                self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif path == "/events":
                self._events()
            elif path in ("/point.json", "/pattern.png"):
                index = _int_arg(url.query, "i")
                if index is None:
                    self._send(400, b"give the point as ?i=INDEX", "text/plain")
                elif path == "/point.json":
                    details = self.provider.point_details(index)
                    self._send(200, json.dumps(details).encode(), "application/json") if details else \
                        self._send(404, b"no such point", "text/plain")
                else:
                    png = self.provider.pattern_png(index)
                    self._send(200, png, "image/png") if png else self._send(404, b"no pattern kept", "text/plain")
            elif path == "/cluster.png":
                value = parse_qs(url.query).get("c", [""])[0]
                png = self.provider.cluster_png(value)
                self._send(200, png, "image/png") if png else self._send(404, b"no mean pattern for that cluster",
                                                                         "text/plain")
            elif path.startswith("/keys/ipf-") and path.endswith(".png"):
                png = self.provider.ipf_key_png(path[len("/keys/ipf-"):-len(".png")])
                self._send(200, png, "image/png") if png else self._send(404, b"no such phase", "text/plain")
            elif path == "/status.json":
                self._send(200, json.dumps(self.provider.status()).encode(), "application/json")
            elif path == "/metrics":
                self._send(200, generate_latest(self.provider.metrics_registry), CONTENT_TYPE_LATEST)
            elif path.startswith("/maps/") and path.endswith(".png"):
                png = self.provider.map_png(path[len("/maps/"):-len(".png")])
                self._send(200, png, "image/png") if png else self._send(404, b"no such map yet", "text/plain")
            elif path.startswith("/files/"):
                file = self.provider.file_path(unquote(path[len("/files/"):]))
                if file is None:
                    self._send(404, b"no such output file", "text/plain")
                else:
                    self._send(200, Path(file).read_bytes(), "application/octet-stream",
                               {"Content-Disposition": f'attachment; filename="{Path(file).name}"'})
            else:
                self._send(404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass

    def _events(self) -> None:
        """Server-sent events: ``map`` with the points that changed, ``status`` every tick."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        scan, version = None, -1
        while not self.closing.is_set():
            update, scan, version = self.provider.map_update(scan, version)
            if update is not None:
                self._event("map", update)
            self._event("status", self.provider.status())
            self.wfile.flush()
            self.closing.wait(EVENT_SECONDS)

    def _event(self, name: str, data: dict) -> None:
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

    def do_POST(self):  # noqa: N802
        self._send(405, b"read-only", "text/plain")

    do_PUT = do_DELETE = do_PATCH = do_POST

    def _send(self, code: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


def _int_arg(query: str, name: str) -> int | None:
    try:
        return int(parse_qs(query)[name][0])
    except (KeyError, ValueError, IndexError):
        return None
