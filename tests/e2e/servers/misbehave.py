#!/usr/bin/python3
"""An upstream that breaks HTTP on purpose, for the end-to-end tests.

The mode comes from --mode (applies to every connection) or else from the
first path segment of each request (/garbage/anything -> "garbage"):
  ok            a valid 200 JSON answer {mode, conn_id, conn_requests}; keep-alive
  close         read the request, close without answering
  garbage       answer a garbage status line, keep the connection open
  clte          answer with both Content-Length and Transfer-Encoding, keep open
  dupcl         answer with two differing Content-Length fields, keep open
  short         Content-Length: 100, send 10 bytes, close
  reset         Content-Length: 1000000, send 100000 bytes, then reset (RST)
  badchunk      chunked answer whose second chunk size is invalid, keep open
  hang          read the request, never answer (until the peer closes)
  eofbody       a 200 with neither Content-Length nor chunked: body until close
  http10        an HTTP/1.0 200 with Content-Length (so not persistent), kept open
  closelie      a 200 with "Connection: close" and Content-Length, kept open
  interim       a 100 Continue, then the real 200 answer
  hugehead      a 200 whose head is 100 kB long
  accept-close  (--mode only) close right after accept, reading nothing
/__stats answers {connections, requests, events}; it is not counted itself.
Options: --port P (required), --mode M. Prints nothing.
"""
import json
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import httpsrv  # noqa: E402
from echo import peer_closed_within  # noqa: E402

STATS = httpsrv.Counter()
OPTS = None


def send_json(sock, doc, status=200):
    body = json.dumps(doc).encode()
    sock.sendall(httpsrv.build_head(status, [["Content-Type", "application/json"],
                                             ["Content-Length", str(len(body))]]) + body)


def reset(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def handle(sock, addr):
    if OPTS.mode == "accept-close":
        with STATS.lock:
            STATS.connections += 1
        return
    reader = httpsrv.Reader(sock)
    conn_id = STATS.new_conn_id()
    counted = False
    conn_requests = 0
    while True:
        req = httpsrv.read_request_head(reader)
        if req is None:
            return
        httpsrv.read_body(reader, req)
        if req.path == "/__stats":
            with STATS.lock:
                doc = {"connections": STATS.connections, "requests": STATS.requests,
                       "events": list(STATS.events)}
            send_json(sock, doc)
            continue
        with STATS.lock:
            if not counted:
                STATS.connections += 1
                counted = True
            STATS.requests += 1
        conn_requests += 1
        mode = OPTS.mode or (req.path.split("/") + [""])[1]
        with STATS.lock:
            STATS.events.append({"mode": mode, "conn_id": conn_id, "conn_requests": conn_requests})
        if mode == "ok":
            send_json(sock, {"mode": mode, "conn_id": conn_id, "conn_requests": conn_requests})
        elif mode == "close":
            return
        elif mode == "garbage":
            sock.sendall(b"HELLO GARBAGE\r\n\r\n")
        elif mode == "clte":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        elif mode == "dupcl":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                         b"Content-Length: 6\r\n\r\nhello!")
        elif mode == "short":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: 100\r\n\r\n0123456789")
            time.sleep(0.05)
            return
        elif mode == "reset":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: 1000000\r\n\r\n" + b"r" * 100000)
            time.sleep(0.1)
            reset(sock)
            return
        elif mode == "badchunk":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n")
        elif mode == "eofbody":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
                         b"until-close-" + b"e" * 20000)
            return
        elif mode == "http10":
            sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nok10")
        elif mode == "closelie":
            sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\nlies")
        elif mode == "interim":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            time.sleep(0.05)
            send_json(sock, {"mode": mode, "conn_id": conn_id, "conn_requests": conn_requests})
        elif mode == "hugehead":
            sock.sendall(b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 100000 +
                         b"\r\nContent-Length: 2\r\n\r\nok")
        elif mode == "hang":
            t0 = time.monotonic()
            peer_closed_within(sock, 60)
            with STATS.lock:
                STATS.events.append({"mode": "hang-end",
                                     "elapsed_ms": int((time.monotonic() - t0) * 1000)})
            return
        else:
            send_json(sock, {"error": "unknown mode %r" % mode}, status=404)


def main():
    global OPTS
    p = httpsrv.base_args("misbehaving upstream")
    p.add_argument("--mode", default="")
    OPTS = p.parse_args()
    httpsrv.serve(handle, OPTS.port)


if __name__ == "__main__":
    main()
