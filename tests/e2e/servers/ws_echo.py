#!/usr/bin/env python3
"""A WebSocket echo upstream for the e2e tests (RFC 6455, standard library
only): ws_echo.py --port N [--tls-cert PEM --tls-key PEM]

Upgrade requests (Connection: upgrade, Upgrade: websocket, a valid
Sec-WebSocket-Key, version 13) get a 101 with Sec-WebSocket-Accept; then
text and binary messages (fragmented or not) are echoed, pings answered
with pongs, and a close answered with a close carrying the same code.
Client frames must be masked (else close 1002). A few text messages are
commands:
  __headers      -> a text message: JSON of the handshake's header fields
  __flood N      -> N bytes of binary data in 64 KiB messages, then "done"
  __close CODE   -> the server starts the close handshake with CODE
  __shutdown     -> the server half-closes (FIN) without a close frame

Plain requests (no upgrade) get 200 with a JSON body describing the
request (method, path, headers), so tests can see what was forwarded.
The target decides other answers:
  /status/NNN    -> a plain NNN answer even to an upgrade
  /switch        -> a 101 (Upgrade: websocket) whatever was asked
  /__conns       -> {"conns": connections accepted so far}
"""
import argparse
import base64
import hashlib
import json
import socket
import socketserver
import ssl
import struct
import sys
import threading

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"
CONNS = [0]
CONNS_LOCK = threading.Lock()
TLS = [None]  # the server context with --tls-cert


def accept_key(key):
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


class Closed(Exception):
    pass


class Handler(socketserver.BaseRequestHandler):
    def setup(self):
        self.sock = self.request
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if TLS[0]:
            self.sock.settimeout(10)
            try:
                self.sock = TLS[0].wrap_socket(self.sock, server_side=True)
                self.sock.settimeout(None)
            except (ssl.SSLError, OSError):
                self.sock = None  # a port probe, or a failed handshake
        self.buf = b""
        self.wlock = threading.Lock()
        with CONNS_LOCK:
            CONNS[0] += 1

    # ---- bytes ---------------------------------------------------------
    def recv_exact(self, n):
        while len(self.buf) < n:
            d = self.sock.recv(max(65536, n - len(self.buf)))
            if not d:
                raise Closed()
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self):
        while b"\r\n\r\n" not in self.buf:
            d = self.sock.recv(65536)
            if not d:
                raise Closed()
            self.buf += d
            if len(self.buf) > 65536:
                raise Closed()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        return method, target, version, headers

    def send_all(self, data):
        with self.wlock:
            self.sock.sendall(data)

    # ---- frames --------------------------------------------------------
    def send_frame(self, opcode, payload, fin=True):
        b0 = (0x80 if fin else 0) | opcode
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", b0, n)
        elif n < 65536:
            head = struct.pack("!BBH", b0, 126, n)
        else:
            head = struct.pack("!BBQ", b0, 127, n)
        self.send_all(head + payload)

    def read_frame(self):
        b0, b1 = self.recv_exact(2)
        fin, opcode = b0 & 0x80, b0 & 0x0F
        masked, n = b1 & 0x80, b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self.recv_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self.recv_exact(8))[0]
        if not masked:
            self.send_frame(0x8, struct.pack("!H", 1002) + b"unmasked client frame")
            raise Closed()
        if n > 64 * 1024 * 1024:
            self.send_frame(0x8, struct.pack("!H", 1009))
            raise Closed()
        mask = self.recv_exact(4)
        data = self.recv_exact(n)
        if n:
            # XOR through big integers: fast enough for MiB messages
            m = (mask * (n // 4 + 1))[:n]
            data = (int.from_bytes(data, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")
        return bool(fin), opcode, data

    # ---- the exchange --------------------------------------------------
    def handle(self):
        if self.sock is None:
            return
        try:
            while True:
                method, target, version, headers = self.read_head()
                h = {k.lower(): v for k, v in headers}
                if not self.answer(method, target, version, headers, h):
                    return
        except (Closed, ConnectionError, OSError):
            pass

    def plain(self, status, body, close=False):
        self.send_all(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n%s\r\n" % (status, len(body),
                                                        b"Connection: close\r\n" if close else b"")
                      + body)

    def answer(self, method, target, version, headers, h):
        n = int(h.get("content-length", "0") or 0)
        if n:
            self.recv_exact(n)
        info = json.dumps({"method": method, "path": target, "version": version,
                           "headers": headers}).encode()
        conn_tokens = [t.strip().lower() for t in h.get("connection", "").split(",")]
        upgrade = "upgrade" in conn_tokens and h.get("upgrade", "").lower() == "websocket"
        if target == "/__conns":
            self.plain(200, json.dumps({"conns": CONNS[0]}).encode())
            return True
        if target.startswith("/status/"):
            self.plain(int(target[8:11]), info)
            return True
        if target.startswith("/switch"):
            self.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\n\r\n")
            return False
        if not upgrade:
            self.plain(200, info)
            return True
        key = h.get("sec-websocket-key", "")
        try:
            ok = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            ok = False
        if not ok or h.get("sec-websocket-version") != "13":
            self.plain(400, b'{"error":"bad websocket handshake"}', close=True)
            return False
        extra = b""
        if "sec-websocket-protocol" in h:
            extra = b"Sec-WebSocket-Protocol: %s\r\n" % (
                h["sec-websocket-protocol"].split(",")[0].strip().encode())
        self.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s\r\n"
                      % (accept_key(key).encode(), extra))
        self.headers_seen = headers
        self.websocket()
        return False

    def websocket(self):
        message, message_op = [], None
        while True:
            fin, op, data = self.read_frame()
            if op == 0x8:
                code = data[:2] if len(data) >= 2 else b""
                self.send_frame(0x8, code)
                self.sock.shutdown(socket.SHUT_WR)
                # wait for the client's FIN (the client closes the TCP connection first)
                self.sock.settimeout(5)
                try:
                    while self.sock.recv(65536):
                        pass
                except OSError:
                    pass
                return
            if op == 0x9:
                self.send_frame(0xA, data)
                continue
            if op == 0xA:
                continue
            if op in (0x1, 0x2):
                message, message_op = [data], op
            elif op == 0x0 and message_op is not None:
                message.append(data)
            else:
                self.send_frame(0x8, struct.pack("!H", 1002))
                raise Closed()
            if not fin:
                continue
            payload, kind = b"".join(message), message_op
            message, message_op = [], None
            if kind == 0x1 and payload.startswith(b"__") and self.command(payload.decode()):
                return
            if kind == 0x1 and payload.startswith(b"__"):
                continue
            self.send_frame(kind, payload)

    def command(self, text):
        """Run a command message; returns True when the exchange is over."""
        word, _, arg = text.partition(" ")
        if word == "__headers":
            self.send_frame(0x1, json.dumps(self.headers_seen).encode())
        elif word == "__flood":
            left = int(arg)
            chunk = b"f" * 65536
            while left > 0:
                k = min(left, len(chunk))
                self.send_frame(0x2, chunk[:k])
                left -= k
            self.send_frame(0x1, b"done")
        elif word == "__close":
            self.send_frame(0x8, struct.pack("!H", int(arg or 1000)))
            # the client's echo of the close ends the exchange
            while True:
                fin, op, data = self.read_frame()
                if op == 0x8:
                    return True
        elif word == "__shutdown":
            self.sock.shutdown(socket.SHUT_WR)
        return False


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    args = ap.parse_args()
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        TLS[0] = ctx
    srv = Server(("127.0.0.1", args.port), Handler)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
