#!/usr/bin/python3
"""Key server for the jwt_auth tests: serves files of a directory, re-read
at every request, so a test rotates keys by rewriting a file.

  GET /jwks.json                          DIR/jwks.json
  GET /.well-known/openid-configuration   DIR/openid.json
  GET /__count                            {"path": requests so far, ...}; not counted

A missing file answers 404. If DIR/delay_ms exists, every answer but
/__count waits that many milliseconds first. Options: --port P, --dir DIR (required),
--cert FILE --key FILE (serve HTTPS). Prints nothing.
"""
import argparse
import http.server
import json
import os
import ssl
import threading
import time

COUNTS = {}
LOCK = threading.Lock()
DIR = "."


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/__count":
            with LOCK:
                body = json.dumps(COUNTS).encode()
            return self.answer(200, body)
        with LOCK:
            COUNTS[path] = COUNTS.get(path, 0) + 1
        try:
            with open(os.path.join(DIR, "delay_ms")) as f:
                time.sleep(int(f.read().strip() or 0) / 1000.0)
        except (OSError, ValueError):
            pass
        files = {"/jwks.json": "jwks.json", "/.well-known/openid-configuration": "openid.json"}
        name = files.get(path)
        try:
            with open(os.path.join(DIR, name), "rb") as f:
                body = f.read()
        except (TypeError, OSError):
            return self.answer(404, b'{"error":"not found"}')
        self.answer(200, body)


def main():
    global DIR
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    a = ap.parse_args()
    DIR = a.dir
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    if a.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.cert, a.key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
