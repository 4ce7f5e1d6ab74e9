#!/usr/bin/python3
"""A gRPC-shaped HTTP/2 upstream for the end-to-end tests (python3-h2).

Speaks HTTP/2 in the clear (h2c, prior knowledge), or over TLS with ALPN h2
(--tls-cert, --tls-key). Messages are gRPC's: a 1-byte flag, a 4-byte
big-endian length, the payload; every answer ends with trailers
grpc-status / grpc-message. Methods (the :path):

  /test.Echo/Unary         one message in, the same message back
  /test.Echo/ServerStream  one message in ("N"), N messages back ("0".."N-1"),
                           10 ms apart
  /test.Echo/ClientStream  messages until the end of the request, then one
                           message back: their count and total length "C:L"
  /test.Echo/Bidi          each message echoed as soon as it arrives
  /test.Echo/Fail          Trailers-Only: grpc-status 5 (NOT_FOUND)
  /test.Echo/Slow          never answers (for deadlines)
  anything else            grpc-status 12 (UNIMPLEMENTED)

Every answer also carries the request's te and content-type as
x-seen-te / x-seen-content-type. GET /__stats answers
{"connections", "streams"} as JSON. Prints nothing.
"""
import json
import select
import socket
import ssl
import sys
import time

# The suite starts upstreams with "python3 -S": find Debian's python3-h2.
sys.path.append("/usr/lib/python3/dist-packages")
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402

STATS = {"connections": 0, "streams": 0}


def frame(msg):
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def messages(buf):
    out = []
    while len(buf) >= 5:
        n = int.from_bytes(buf[1:5], "big")
        if len(buf) < 5 + n:
            break
        out.append(buf[5:5 + n])
        buf = buf[5 + n:]
    return out, buf


class Conn:
    def __init__(self, sock):
        self.sock = sock
        cfg = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.h2.initiate_connection()
        self.streams = {}
        self.timers = []  # (when, stream, payload or None for the end)
        self.flush()

    def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def head(self, sid, st, extra=()):
        hdrs = [(":status", "200"), ("content-type", "application/grpc"),
                ("x-seen-te", st["headers"].get("te", "")),
                ("x-seen-content-type", st["headers"].get("content-type", ""))] + list(extra)
        self.h2.send_headers(sid, hdrs)

    def send_msg(self, sid, payload):
        self.h2.send_data(sid, frame(payload))

    def end(self, sid, status=0, message=""):
        self.h2.send_headers(sid, [("grpc-status", str(status)), ("grpc-message", message)],
                             end_stream=True)

    def on_request(self, sid):
        st = self.streams[sid]
        path = st["headers"][":path"]
        STATS["streams"] += 1
        if path == "/__stats":
            body = json.dumps(STATS).encode()
            self.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/json"),
                                       ("content-length", str(len(body)))])
            self.h2.send_data(sid, body, end_stream=True)
        elif path == "/test.Echo/Fail":
            self.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                       ("grpc-status", "5"), ("grpc-message", "no such thing")],
                                 end_stream=True)
        elif path == "/test.Echo/Bidi":
            self.head(sid, st)
            st["started"] = True
        elif path not in ("/test.Echo/Unary", "/test.Echo/ServerStream",
                          "/test.Echo/ClientStream", "/test.Echo/Slow"):
            self.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                       ("grpc-status", "12"), ("grpc-message", "unknown")],
                                 end_stream=True)

    def on_messages(self, sid, msgs, ended):
        st = self.streams[sid]
        path = st["headers"][":path"]
        st["msgs"] += msgs
        if path == "/test.Echo/Bidi":
            for m in msgs:
                self.send_msg(sid, m)
            if ended:
                self.end(sid)
        elif ended and path == "/test.Echo/Unary":
            self.head(sid, st)
            for m in st["msgs"][:1]:
                self.send_msg(sid, m)
            self.end(sid)
        elif ended and path == "/test.Echo/ClientStream":
            self.head(sid, st)
            self.send_msg(sid, b"%d:%d" % (len(st["msgs"]), sum(len(m) for m in st["msgs"])))
            self.end(sid)
        elif ended and path == "/test.Echo/ServerStream":
            self.head(sid, st)
            n = int(st["msgs"][0]) if st["msgs"] else 0
            now = time.time()
            for i in range(n):
                self.timers.append((now + 0.01 * (i + 1), sid, b"%d" % i))
            self.timers.append((now + 0.01 * (n + 1), sid, None))

    def run_timers(self):
        now = time.time()
        due = [t for t in self.timers if t[0] <= now]
        self.timers = [t for t in self.timers if t[0] > now]
        for _, sid, payload in due:
            try:
                if payload is None:
                    self.end(sid)
                else:
                    self.send_msg(sid, payload)
            except Exception:
                pass
        if due:
            self.flush()

    def on_data(self, data):
        for ev in self.h2.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                self.streams[ev.stream_id] = {"headers": dict(ev.headers), "buf": b"",
                                              "msgs": [], "started": False}
                self.on_request(ev.stream_id)  # its end comes as StreamEnded
            elif isinstance(ev, h2.events.DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                st = self.streams.get(ev.stream_id)
                if st is None:
                    continue
                msgs, st["buf"] = messages(st["buf"] + ev.data)
                self.on_messages(ev.stream_id, msgs, False)
            elif isinstance(ev, h2.events.StreamEnded):
                if ev.stream_id in self.streams:
                    self.on_messages(ev.stream_id, [], True)
        self.flush()


def main():
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])
    ctx = None
    if "--tls-cert" in args:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args[args.index("--tls-cert") + 1], args[args.index("--tls-key") + 1])
        ctx.set_alpn_protocols(["h2"])
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(128)
    conns = {}
    while True:
        timeout = 0.005 if any(c.timers for c in conns.values()) else 0.5
        r, _, _ = select.select([ls] + list(conns), [], [], timeout)
        for s in r:
            if s is ls:
                cs, _ = ls.accept()
                try:
                    if ctx:
                        cs = ctx.wrap_socket(cs, server_side=True)
                    conns[cs] = Conn(cs)
                    STATS["connections"] += 1
                except (OSError, ssl.SSLError):
                    cs.close()
                continue
            try:
                data = s.recv(65536)
            except (OSError, ssl.SSLError):
                data = b""
            if not data:
                conns.pop(s, None)
                s.close()
                continue
            try:
                conns[s].on_data(data)
            except Exception:
                conns.pop(s, None)
                s.close()
        for c in list(conns.values()):
            c.run_timers()


if __name__ == "__main__":
    main()
