"""Minimal HTTP/1.1 server plumbing shared by the test upstreams.

Standard library only. Deliberately hand-written (not http.server) so the
tests control framing exactly: chunked request bodies, keep-alive, and
responses that break the rules on purpose.
"""
import argparse
import socket
import socketserver
import threading


class Reader:
    """Buffered reads from a socket. Raises EOFError at end of stream."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self, n=65536):
        data = self.sock.recv(n)
        if not data:
            raise EOFError
        self.buf += data

    def pending(self):
        return len(self.buf)

    def readline(self, limit=65536):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > limit:
                raise ValueError("line too long")
            self._fill()

    def read(self, n):
        while len(self.buf) < n:
            self._fill(max(65536, min(n - len(self.buf), 1 << 20)))
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_some(self, n):
        """Up to n bytes (at least one)."""
        if not self.buf:
            self._fill(max(n, 65536))
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data


class Request:
    def __init__(self, method, target, version, headers):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers  # list of [name, value] as received
        self.framing = "none"
        self.trailers = []

    def get(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def get_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    @property
    def path(self):
        return self.target.split("?", 1)[0]

    @property
    def query(self):
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    def wants_close(self):
        conn = ",".join(self.get_all("connection")).lower()
        tokens = [t.strip() for t in conn.split(",")]
        if "close" in tokens:
            return True
        if self.version == "HTTP/1.0" and "keep-alive" not in tokens:
            return True
        return False


def read_request_head(reader):
    """Returns a Request, or None when the peer closed before a request began."""
    try:
        line = reader.readline()
        while line in (b"\r\n", b"\n"):  # tolerate stray CRLF between requests
            line = reader.readline()
    except EOFError:
        return None
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3:
        raise ValueError("bad request line %r" % line)
    method, target, version = parts
    headers = []
    while True:
        line = reader.readline()
        if line in (b"\r\n", b"\n"):
            break
        text = line.decode("latin-1").rstrip("\r\n")
        name, _, value = text.partition(":")
        headers.append([name, value.strip(" \t")])
    return Request(method, target, version, headers)


def iter_body(reader, req, piece=262144):
    """Yields the request body in pieces (constant memory); sets req.framing."""
    te = ",".join(req.get_all("transfer-encoding")).lower()
    if "chunked" in te:
        req.framing = "chunked"
        while True:
            size_line = reader.readline().decode("latin-1").strip()
            size = int(size_line.split(";", 1)[0].strip(), 16)
            if size == 0:
                while True:
                    t = reader.readline()
                    if t in (b"\r\n", b"\n"):
                        return
                    name, _, value = t.decode("latin-1").rstrip("\r\n").partition(":")
                    req.trailers.append([name, value.strip()])
            left = size
            while left:
                data = reader.read_some(min(left, piece))
                left -= len(data)
                yield data
            if reader.read(2) != b"\r\n":
                raise ValueError("bad chunk terminator")
    cl = req.get("content-length")
    if cl is not None:
        req.framing = "length"
        left = int(cl)
        while left:
            data = reader.read_some(min(left, piece))
            left -= len(data)
            yield data


def read_body(reader, req):
    return b"".join(iter_body(reader, req))


def build_head(status, headers, reason=None):
    reason = reason or REASONS.get(status, "Status")
    lines = ["HTTP/1.1 %d %s" % (status, reason)]
    for k, v in headers:
        lines.append("%s: %s" % (k, v))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content",
    301: "Moved Permanently", 304: "Not Modified", 400: "Bad Request",
    404: "Not Found", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable",
}


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def serve(handler_fn, port, ssl_ctx=None, host="127.0.0.1"):
    """Run handler_fn(sock, addr) per accepted connection, forever; with
    ssl_ctx, each connection is TLS (the handshake runs in its thread)."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock = self.request
                if ssl_ctx is not None:
                    sock = ssl_ctx.wrap_socket(sock, server_side=True)
                handler_fn(sock, self.client_address)
            except (OSError, EOFError, ValueError):
                pass

    srv = Server((host, port), Handler)
    srv.serve_forever(poll_interval=0.5)


def base_args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="a loopback address to listen on")
    return p


class Counter:
    def __init__(self):
        self.lock = threading.Lock()
        self.connections = 0
        self.requests = 0
        self.next_conn_id = 0
        self.events = []

    def new_conn_id(self):
        with self.lock:
            self.next_conn_id += 1
            return self.next_conn_id
