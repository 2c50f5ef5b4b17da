"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a local Hub (olah): not a test module.

`FaultyProxy(upstream)` forwards every request to `upstream` unchanged (bytes, status, headers;
redirects to the upstream are rewritten to come back through the proxy) unless a fault rule matches:
  * `fail_first(n, status=503)`: the next n requests answer `status`;
  * `fail_matching(substring, status=503, methods=None)`: every request (of those methods) whose
    path contains substring answers `status`;
  * `truncate_matching(substring)`: a GET whose path contains substring sends the full headers
    (Content-Length included) and half the body, then closes the connection;
  * `on_request(fn)`: fn(method, path) is called before each request is handled (e.g. to stop the
    upstream server mid-download).
An upstream that refuses the connection (stopped) makes the proxy drop the client's connection
without an answer, as a stopped server on the other side of a network would look to the client.
`requests` lists (method, path, what happened) for assertions; `authorizations` the Authorization
headers clients sent (to prove a token was in use).
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
        "transfer-encoding", "upgrade"}


class FaultyProxy:
    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.requests: list[tuple[str, str, str]] = []
        self.authorizations: list[str] = []
        self._lock = threading.Lock()
        self._fail_left = 0
        self._fail_status = 503
        self._fail_paths: list[tuple[str, int, tuple[str, ...] | None]] = []
        self._truncate_paths: list[str] = []
        self._callbacks: list = []
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self._listen()

    def _listen(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name="faulty-proxy", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop_listening(self) -> None:
        """Close the listening socket: new connections are refused, like a stopped server's.
        Callable from a request handler (runs the shutdown in another thread)."""
        server, self.server = self.server, None
        if server is not None:
            done = threading.Thread(target=lambda: (server.shutdown(), server.server_close()))
            done.start()
            done.join(10)

    def start_listening(self) -> None:
        """Listen again on the same port."""
        if self.server is None:
            self._listen()

    # --- fault rules ---------------------------------------------------------------------------
    def fail_first(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._fail_left, self._fail_status = n, status

    def fail_matching(self, substring: str, status: int = 503, methods: tuple[str, ...] | None = None) -> None:
        with self._lock:
            self._fail_paths.append((substring, status, methods))

    def truncate_matching(self, substring: str) -> None:
        with self._lock:
            self._truncate_paths.append(substring)

    def on_request(self, fn) -> None:
        with self._lock:
            self._callbacks.append(fn)

    def heal(self) -> None:
        """Remove every fault: from now on the proxy forwards everything."""
        with self._lock:
            self._fail_left, self._fail_paths, self._truncate_paths = 0, [], []
            self._callbacks = []

    def count(self, what: str) -> int:
        return sum(1 for r in self.requests if r[2] == what)

    # --- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_listening()

    # --- the handler ---------------------------------------------------------------------------
    def _decide(self, method: str, path: str) -> tuple[str, int]:
        with self._lock:
            if self._fail_left > 0:
                self._fail_left -= 1
                return "fail", self._fail_status
            for sub, status, methods in self._fail_paths:
                if sub in path and (methods is None or method in methods):
                    return "fail", status
            if method == "GET" and any(sub in path for sub in self._truncate_paths):
                return "truncate", 0
        return "forward", 0

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: the test asserts on proxy.requests
                pass

            def _serve(self) -> None:
                for fn in list(proxy._callbacks):
                    fn(self.command, self.path)
                action, status = proxy._decide(self.command, self.path)
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, action))
                    if self.headers.get("Authorization"):
                        proxy.authorizations.append(self.headers["Authorization"])
                if action == "fail":
                    body = b'{"error": "injected fault"}'
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                    self.close_connection = True
                    return
                length = int(self.headers.get("Content-Length") or 0)
                payload = self.rfile.read(length) if length else None
                up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Host"] = proxy.upstream.netloc
                try:
                    up.request(self.command, self.path, body=payload, headers=headers)
                    resp = up.getresponse()
                    data = resp.read() if self.command != "HEAD" else b""
                except OSError:
                    with proxy._lock:
                        proxy.requests.append((self.command, self.path, "dropped"))
                    self.close_connection = True
                    return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() in _HOP or k.lower() == "content-length":
                        continue
                    if k.lower() == "location":
                        v = v.replace(proxy.upstream.netloc, urllib.parse.urlsplit(proxy.endpoint).netloc)
                    self.send_header(k, v)
                length_header = resp.getheader("Content-Length")
                if self.command == "HEAD":
                    self.send_header("Content-Length", length_header or "0")
                else:
                    self.send_header("Content-Length", str(len(data)))
                up.close()
                if action == "truncate" and data:
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.end_headers()
                if data:
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = _serve

        return Handler
