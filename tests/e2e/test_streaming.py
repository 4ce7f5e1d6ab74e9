"""Bodies are streamed, not stored: a 1 GiB upload and download go through
with portico's memory staying small, a slow reader applies back-pressure,
and response bytes are relayed as they come.

E2E_BIG_MIB sets the size of the big transfers (default 1024 MiB)."""
import hashlib
import os
import socket
import threading
import time

import util

BIG = int(os.environ.get("E2E_BIG_MIB", "1024")) * 1024 * 1024
MID = 256 * 1024 * 1024
RSS_LIMIT_KB = 64 * 1024
EXPECT = util.PATTERN * 40       # 2.5 MiB of the /big pattern, for offset checks
MIB = 1 << 20

UNHURRIED = {"limits": {"max_body_bytes": 0, "body_timeout_ms": 60000, "send_timeout_ms": 60000},
             "upstream_opts": {"timeout_ms": 60000}}


class RssSampler:
    """Samples VmRSS of a process every 20 ms; max_kb is the peak seen."""

    def __init__(self, pid):
        self.pid = pid
        self.max_kb = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.max_kb = max(self.max_kb, util.proc_status_kb(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return
            self._stop.wait(0.02)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


class PatternCheck:
    """A body sink verifying the echo server's /big pattern at every offset."""

    def __init__(self):
        self.off = 0
        self.bad_at = None

    def __call__(self, data):
        for i in range(0, len(data), MIB):
            piece = data[i:i + MIB]
            o = self.off % 256
            if self.bad_at is None and piece != EXPECT[o:o + len(piece)]:
                self.bad_at = self.off
            self.off += len(piece)


def assert_small(p, sampler):
    hwm = p.hwm_kb()
    assert sampler.max_kb < RSS_LIMIT_KB, "VmRSS peaked at %d kB" % sampler.max_kb
    assert hwm < RSS_LIMIT_KB, "VmHWM %d kB" % hwm


def upload(g, n, chunked):
    h = hashlib.sha256()
    with RssSampler(g.portico.pid) as s, g.conn(timeout=30.0) as c:
        if chunked:
            c.send(b"POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            c.send(b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % n)
        sent = 0
        while sent < n:
            k = min(n - sent, MIB)
            block = util.PATTERN_MIB[:k]
            if chunked:
                c.send(b"%x\r\n" % k + block + b"\r\n")
            else:
                c.send(block)
            h.update(block)
            sent += k
        if chunked:
            c.send(b"0\r\n\r\n")
        r = c.read_response()
    assert r.status == 200, r
    j = r.json()
    assert j["length"] == n
    assert j["sha256"] == h.hexdigest()
    assert j["framing"] == ("chunked" if chunked else "length")
    assert_small(g.portico, s)


def download(g, target, n, framing):
    check = PatternCheck()
    with RssSampler(g.portico.pid) as s, g.conn(timeout=30.0) as c:
        c.request("GET", target)
        r = c.read_response(sink=check)
        assert r.status == 200
        assert r.framing == framing
        assert r.complete
    assert r.body_len == n
    assert check.bad_at is None, "body differs at offset %d" % check.bad_at
    assert_small(g.portico, s)


def test_big_upload_content_length(gateway):
    upload(gateway(**UNHURRIED), BIG, chunked=False)


def test_big_download_content_length(gateway):
    download(gateway(**UNHURRIED), "/big/%d" % BIG, BIG, "length")


def test_chunked_upload_256_mib(gateway):
    upload(gateway(**UNHURRIED), MID, chunked=True)


def test_chunked_download_256_mib(gateway):
    download(gateway(**UNHURRIED), "/bigchunked/%d" % MID, MID, "chunked")


def test_slow_reader_gets_back_pressure(gateway):
    g = gateway(**UNHURRIED)
    n = 512 * MIB
    c = g.conn(timeout=5.0, rcvbuf=65536)
    try:
        with RssSampler(g.portico.pid) as s:
            c.request("GET", "/big/%d" % n)
            got = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3.0:
                d = c.sock.recv(65536)
                assert d, "connection closed early"
                got += len(d)
                time.sleep(0.02)
    finally:
        c.close()
    assert got < n
    assert_small(g.portico, s)


def test_response_bytes_relayed_as_they_come(gw):
    with gw.conn(timeout=5.0) as c:
        t0 = time.monotonic()
        c.request("GET", "/drip/200?n=8")
        r = c.read_head()
        assert r.status == 200 and r.header("content-length") == "8"
        while not c.buf:
            c._fill(1)
        first = time.monotonic() - t0
        body = bytes(c.buf)
        c.buf.clear()
        while len(body) < 8:
            d = c.sock.recv(8)
            assert d
            body += d
        total = time.monotonic() - t0
    assert body == b"abcdefgh"
    assert first < 1.0, "first body byte after %.2f s: response buffered?" % first
    assert total >= 1.4


def test_slow_upstream_reader_gets_back_pressure(gateway):
    """An upload to an upstream reading at about 3 MB/s: portico must not
    soak up the client's body faster than the upstream takes it."""
    g = gateway(**UNHURRIED)
    n = 512 * MIB
    c = g.conn(timeout=0.5)
    sent = 0
    try:
        with RssSampler(g.portico.pid) as s:
            c.send(b"POST /slowsink HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % n)
            t0 = time.monotonic()
            block = memoryview(util.PATTERN_MIB)
            while time.monotonic() - t0 < 3.0:
                try:
                    sent += c.sock.send(block)
                except socket.timeout:
                    pass
    finally:
        c.close()
    assert sent < 256 * MIB, "%d MiB accepted in 3 s by a 3 MB/s upstream" % (sent // MIB)
    assert_small(g.portico, s)
