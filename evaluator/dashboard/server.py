"""A minimal read-only HTTP/1.1 server for the dashboard, on the evaluator's asyncio loop.

Routes: ``GET /`` (the page), ``GET /static/<name>`` (files shipped in ``static/``, cached by the
browser), ``GET /api/state`` (the run's state as JSON). Anything else is 404, any other method 405.
Only files loaded from ``static/`` at start-up can be served, by exact name, so no request path can
reach another file. One request per connection (the page polls once a second: keep-alive buys nothing).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from apex_zmq.transport import host_is_loopback

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_HEAD_BYTES = 8192
READ_TIMEOUT_S = 10.0
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".json": "application/json",
                 ".png": "image/png", ".svg": "image/svg+xml"}
REASONS = {200: "OK", 304: "Not Modified", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 431: "Request Header Fields Too Large",
           500: "Internal Server Error"}
# Everything the page needs comes from this server: no inline script, no CDN, no other origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class StaticFile:
    """A file served from memory, with its ETag."""

    body: bytes
    content_type: str
    etag: str


@dataclass
class Response:
    """Status, headers and body of one reply."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The bytes on the wire (HTTP/1.1, connection closed after it)."""
        headers = {"Content-Length": str(len(self.body)), "Connection": "close", **SECURITY_HEADERS,
                   **self.headers}
        lines = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def load_static(directory: Path = STATIC_DIR) -> dict[str, StaticFile]:
    """Every regular file directly in ``directory``, by name (read once: the page never changes)."""
    files: dict[str, StaticFile] = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            body = p.read_bytes()
            files[p.name] = StaticFile(body, CONTENT_TYPES.get(p.suffix, "text/plain; charset=utf-8"),
                                       '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
    if "index.html" in files:
        # The page asks for static/<name>?v=<hash>: a newer package's files are fetched at once even
        # though the browser keeps the old ones cached for a day.
        page = files["index.html"].body.decode()
        for name, f in files.items():
            page = page.replace(f'"static/{name}"', f'"static/{name}?v={f.etag.strip(chr(34))}"')
        body = page.encode()
        files["index.html"] = StaticFile(body, files["index.html"].content_type,
                                         '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
    return files


def _text(status: int, message: str, **headers: str) -> Response:
    return Response(status, (message + "\n").encode(), {"Content-Type": "text/plain; charset=utf-8",
                                                       "Cache-Control": "no-store", **headers})


def _static(f: StaticFile, request_headers: dict[str, str], cache: str) -> Response:
    headers = {"Content-Type": f.content_type, "Cache-Control": cache, "ETag": f.etag}
    if request_headers.get("if-none-match") == f.etag:
        return Response(304, b"", headers)
    return Response(200, f.body, headers)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def route(method: str, target: str, headers: dict[str, str], static: dict[str, StaticFile],
          state: Callable[[], dict[str, Any]], allowed_hosts: tuple[str, ...] | None = None) -> Response:
    """The reply to one request (pure: no sockets). ``headers`` have lower-case names."""
    if method != "GET":
        return _text(405, "only GET is served", Allow="GET")
    if allowed_hosts is not None:
        # A loopback dashboard answers only to loopback names: a web page whose DNS name is rebound
        # to 127.0.0.1 would otherwise read the run's state from the user's browser.
        try:
            host = urlsplit("//" + headers.get("host", "")).hostname or ""
        except ValueError:  # e.g. "[::1" (an unclosed IPv6 literal)
            host = ""
        if host not in allowed_hosts:
            return _text(403, f"host {headers.get('host', '')!r} not served")
    path = unquote(urlsplit(target).path)
    if path in ("/", "/index.html"):
        return _static(static["index.html"], headers, "no-cache")
    if path == "/api/state":
        body = json.dumps(state(), allow_nan=False, separators=(",", ":")).encode()
        return Response(200, body, {"Content-Type": "application/json", "Cache-Control": "no-store"})
    if path.startswith("/static/"):
        name = path[len("/static/"):]
        # Exact names of the files loaded at start-up: "../x", "a/b" or "%2e%2e/x" cannot match one.
        if name in static and "/" not in name and "\\" not in name and not name.startswith("."):
            # The page asks for static/<name>?v=<content hash> (see load_static): a day of caching
            # never serves a stale file after an upgrade.
            return _static(static[name], headers, "public, max-age=86400")
    return _text(404, "not found")


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Method, target and lower-cased headers of a request head; ValueError if malformed."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise ValueError(f"bad request line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError("bad header line")
        headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


def check_host(host: str, insecure: bool) -> None:
    """Refuse a non-loopback dashboard address unless the run is marked insecure."""
    if not host_is_loopback(host) and not insecure:
        raise SystemExit(
            f"refusing to serve the dashboard on {host or 'every interface'}: the page is read-only but "
            "has no authentication or encryption, so anyone who can reach the port sees the run's "
            "metrics, configuration and paths; pass --insecure on a trusted network, or keep "
            "--dashboard-host 127.0.0.1 and tunnel (ssh -L 8080:127.0.0.1:8080 HOST)")


class Dashboard:
    """The running server: its URL and a ``close()``."""

    def __init__(self, state: Callable[[], dict[str, Any]], host: str, insecure: bool,
                 static: dict[str, StaticFile] | None = None) -> None:
        check_host(host, insecure)
        self.host = host
        self.state = state
        self.static = static if static is not None else load_static()
        self.allowed_hosts = (*LOOPBACK_NAMES, host) if host_is_loopback(host) else None
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.fell_back = False  # the configured port was taken and a free one is used instead

    async def start(self, port: int) -> "Dashboard":
        """Bind ``host:port`` (0: a free port; a taken port also falls back to a free one)."""
        try:
            self.server = await asyncio.start_server(self._serve, self.host, port, limit=MAX_HEAD_BYTES)
        except OSError as e:
            if port == 0:
                raise SystemExit(f"cannot serve the dashboard on {self.host}: {e}") from None
            # The dashboard is a view of the run, not part of training: a taken port (a second run
            # on this machine) must not stop the evaluator. The URL actually used is printed.
            self.server = await asyncio.start_server(self._serve, self.host, 0, limit=MAX_HEAD_BYTES)
            self.fell_back = True
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        """Where a browser finds the page."""
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()  # bound to every interface: name this machine
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write((await self._respond(reader)).encode())
            await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> Response:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            method, target, headers = parse_head(head[:-4])
        except asyncio.TimeoutError:
            return _text(408, "request timeout")
        except asyncio.LimitOverrunError:
            return _text(431, f"request head over {MAX_HEAD_BYTES} bytes")
        except ValueError as e:
            return _text(400, f"bad request: {e}")
        try:
            return route(method, target, headers, self.static, self.state, self.allowed_hosts)
        except Exception as e:  # a bug in the state must not take the evaluator down
            return _text(500, f"internal error: {type(e).__name__}: {e}")

    async def close(self) -> None:
        """Stop listening."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
