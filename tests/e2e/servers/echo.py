#!/usr/bin/python3
"""Echo upstream for the end-to-end tests.

Every request is answered with JSON describing what was received (method,
target, version, headers as [name, value] pairs, body as latin-1, the body
framing, trailers), plus the process' stats {connections, requests} and
this connection's own request count. Connections are kept alive.

Special paths:
  /status/N          answer with status N
  /slow/MS           sleep MS then answer; notices a peer that closes while
                     it sleeps and records it (see /__stats)
  /big/N             N bytes of a fixed pattern, Content-Length, streamed
  /bigchunked/N      the same with chunked encoding
  /drip/MS?n=K       head at once, then K body bytes (default 10) one every MS
  POST /sink         reads the body streaming; answers {length, sha256}
  POST /slowsink     the same, reading 64 KiB every 20 ms (about 3 MB/s)
  /headers-out?a=b   answers with the given response headers
  /trailers?a=b      a chunked body "hello" then the given fields as trailers
  /__stats           {connections, requests, events}; not counted itself
  /__fail/N          from now on answer every other request with status N
                     (0: back to normal); ?retry_after=S adds Retry-After: S;
                     not counted itself (tests make an endpoint "fail")

Byte k of a /big body is k % 256.
Options: --port P (required), --host 127.0.0.N (default 127.0.0.1),
--idle-close-ms MS (close a keep-alive connection idle that long),
--name NAME (answers carry "server": NAME), --tls-cert FILE --tls-key FILE
(speak TLS; then /__stats too is over TLS, and /slow cannot notice a peer
closing), --tls-client-ca FILE (require a client certificate from that CA;
its subject is echoed as "client_subject").
Prints nothing.
"""
import hashlib
import json
import select
import socket
import sys
import time
import urllib.parse

sys.path.insert(0, __import__("os").path.dirname(__file__))
import httpsrv  # noqa: E402

PATTERN = bytes(range(256)) * 256  # 64 KiB; byte k is k % 256
STATS = httpsrv.Counter()
OPTS = None
TLS_CTX = None
CLIENT_SUBJECT = {}  # conn_id -> the TLS client certificate's subject
FAIL = {"status": 0, "retry_after": None}


def peer_closed_within(sock, seconds):
    """Sleep up to seconds; return True as soon as the peer closes."""
    deadline = time.monotonic() + seconds
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ev = poller.poll(left * 1000)
        if not ev:
            return False
        mask = ev[0][1]
        if mask & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
            return True
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except OSError:
            return True
        if not data:
            return True
        # A pipelined request is waiting: cannot tell closure; just sleep.
        time.sleep(max(0.0, deadline - time.monotonic()))
        return False


def send(sock, status, body=b"", headers=(), head_only=False, close=False,
         ctype="application/json"):
    hdrs = [["Content-Type", ctype]] if ctype else []
    hdrs += [list(h) for h in headers]
    if status >= 200 and status not in (204, 304):
        hdrs.append(["Content-Length", str(len(body))])
    else:
        body = b""
    if close:
        hdrs.append(["Connection", "close"])
    data = httpsrv.build_head(status, hdrs)
    if not head_only:
        data += body
    sock.sendall(data)


def describe(req, body, conn_id, conn_requests):
    with STATS.lock:
        stats = {"connections": STATS.connections, "requests": STATS.requests}
    return {
        "method": req.method,
        "target": req.target,
        "version": req.version,
        "headers": req.headers,
        "body": body.decode("latin-1"),
        "body_len": len(body),
        "framing": req.framing,
        "trailers": req.trailers,
        "stats": stats,
        "server": OPTS.name,
        "conn_id": conn_id,
        "conn_requests": conn_requests,
        "port": OPTS.port,
        "client_subject": CLIENT_SUBJECT.get(conn_id),
    }


def send_big(sock, n, chunked, head_only):
    hdrs = [["Content-Type", "application/octet-stream"]]
    hdrs.append(["Transfer-Encoding", "chunked"] if chunked else ["Content-Length", str(n)])
    sock.sendall(httpsrv.build_head(200, hdrs))
    if head_only:
        return
    view = memoryview(PATTERN)
    left = n
    while left:
        k = min(left, len(PATTERN))
        if chunked:
            sock.sendall(b"%x\r\n" % k)
            sock.sendall(view[:k])
            sock.sendall(b"\r\n")
        else:
            sock.sendall(view[:k])
        left -= k
    if chunked:
        sock.sendall(b"0\r\n\r\n")


def send_drip(sock, ms, n):
    sock.sendall(httpsrv.build_head(200, [["Content-Type", "text/plain"],
                                         ["Content-Length", str(n)]]))
    for i in range(n):
        time.sleep(ms / 1000.0)
        sock.sendall(bytes([ord("a") + i % 26]))


def handle(sock, addr):
    reader = httpsrv.Reader(sock)
    conn_id = STATS.new_conn_id()
    if hasattr(sock, "getpeercert") and sock.getpeercert():
        CLIENT_SUBJECT[conn_id] = dict(x[0] for x in sock.getpeercert()["subject"])
    counted = False
    conn_requests = 0
    while True:
        if OPTS.idle_close_ms and not reader.pending():
            sock.settimeout(OPTS.idle_close_ms / 1000.0)
            try:
                reader._fill()
            except socket.timeout:
                return
            finally:
                sock.settimeout(None)
        req = httpsrv.read_request_head(reader)
        if req is None:
            return
        path = req.path
        head_only = req.method == "HEAD"
        close = req.wants_close()
        if path == "/__stats":
            httpsrv.read_body(reader, req)
            with STATS.lock:
                out = {"connections": STATS.connections, "requests": STATS.requests,
                       "events": list(STATS.events)}
            if TLS_CTX is not None:
                out["tls_session_hits"] = TLS_CTX.session_stats()["hits"]
            send(sock, 200, json.dumps(out).encode(), close=close)
            if close:
                return
            continue
        if path.startswith("/__fail/"):
            httpsrv.read_body(reader, req)
            q = dict(urllib.parse.parse_qsl(req.query))
            FAIL["status"] = int(path.split("/")[2])
            FAIL["retry_after"] = q.get("retry_after")
            send(sock, 200, b"{}", close=close)
            if close:
                return
            continue
        with STATS.lock:
            if not counted:
                STATS.connections += 1
                counted = True
            STATS.requests += 1
        conn_requests += 1
        if "100-continue" in (req.get("expect") or "").lower():
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

        if req.method == "POST" and path in ("/sink", "/slowsink"):
            h = hashlib.sha256()
            n = 0
            slow = path == "/slowsink"
            for piece in httpsrv.iter_body(reader, req, piece=65536 if slow else 262144):
                h.update(piece)
                n += len(piece)
                if slow:
                    time.sleep(0.02)
            out = {"length": n, "sha256": h.hexdigest(), "framing": req.framing}
            send(sock, 200, json.dumps(out).encode(), head_only=head_only, close=close)
            if close:
                return
            continue

        body = httpsrv.read_body(reader, req)
        parts = path.split("/")
        if FAIL["status"]:
            doc = describe(req, body, conn_id, conn_requests)
            extra = [["Retry-After", FAIL["retry_after"]]] if FAIL["retry_after"] else []
            send(sock, FAIL["status"], json.dumps(doc).encode(), headers=extra,
                 head_only=head_only, close=close)
        elif path.startswith("/status/"):
            status = int(parts[2])
            doc = describe(req, body, conn_id, conn_requests)
            send(sock, status, json.dumps(doc).encode(), head_only=head_only, close=close)
        elif path.startswith("/slow/"):
            ms = int(parts[2])
            t0 = time.monotonic()
            gone = peer_closed_within(sock, ms / 1000.0)
            elapsed = int((time.monotonic() - t0) * 1000)
            with STATS.lock:
                STATS.events.append({"path": path, "outcome": "peer_closed" if gone else "answered",
                                     "elapsed_ms": elapsed})
            if gone:
                return
            doc = describe(req, body, conn_id, conn_requests)
            send(sock, 200, json.dumps(doc).encode(), head_only=head_only, close=close)
        elif path.startswith("/big/") or path.startswith("/bigchunked/"):
            send_big(sock, int(parts[2]), path.startswith("/bigchunked/"), head_only)
        elif path.startswith("/drip/"):
            q = dict(urllib.parse.parse_qsl(req.query))
            send_drip(sock, int(parts[2]), int(q.get("n", "10")))
        elif path == "/trailers":
            tr = urllib.parse.parse_qsl(req.query, keep_blank_values=True)
            data = httpsrv.build_head(200, [["Content-Type", "text/plain"],
                                            ["Transfer-Encoding", "chunked"]])
            data += b"5\r\nhello\r\n0\r\n"
            data += b"".join(("%s: %s\r\n" % (k, v)).encode() for k, v in tr) + b"\r\n"
            sock.sendall(data)
        elif path == "/headers-out":
            out_headers = urllib.parse.parse_qsl(req.query, keep_blank_values=True)
            for k, v in out_headers:
                if k.lower() == "connection" and "close" in v.lower():
                    close = True
            doc = describe(req, body, conn_id, conn_requests)
            hdrs = [["Content-Type", "application/json"]] + [[k, v] for k, v in out_headers]
            hdrs.append(["Content-Length", str(len(json.dumps(doc).encode()))])
            data = httpsrv.build_head(200, hdrs)
            sock.sendall(data if head_only else data + json.dumps(doc).encode())
        else:
            doc = describe(req, body, conn_id, conn_requests)
            send(sock, 200, json.dumps(doc).encode(), head_only=head_only, close=close)
        if close:
            return


def main():
    global OPTS, TLS_CTX
    p = httpsrv.base_args("echo upstream")
    p.add_argument("--idle-close-ms", type=int, default=0)
    p.add_argument("--name", default="echo", help="reported as \"server\" in every answer")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-client-ca")
    OPTS = p.parse_args()
    ctx = None
    if OPTS.tls_cert:
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(OPTS.tls_cert, OPTS.tls_key)
        if OPTS.tls_client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(OPTS.tls_client_ca)
    TLS_CTX = ctx
    httpsrv.serve(handle, OPTS.port, ctx, OPTS.host)


if __name__ == "__main__":
    main()
