"""bench/origin.c, the origin bench/run.sh puts behind every proxy: built
here with the system's C compiler and driven over real sockets. The bench
compares the proxies' bodies with these bytes, so the origin must answer
exactly, in order, and whole, including to a reader slower than it."""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import util
from conftest import Proc, free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent.parent
SMALL = b"hello from the bench origin\n"


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    cc = shutil.which(os.environ.get("CC", "cc"))
    if not cc:
        pytest.fail("no C compiler (cc) to build bench/origin.c")
    d = tmp_path_factory.mktemp("origin")
    binary = d / "origin"
    subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary),
                    str(ROOT / "bench" / "origin.c")], check=True)
    www = d / "www"
    www.mkdir()
    files = {"4k.bin": os.urandom(4096), "64k.bin": os.urandom(65536)}
    for name, data in files.items():
        (www / name).write_bytes(data)
    port = free_port()
    p = Proc("origin", [str(binary), "-p", str(port), "-d", str(www)], d)
    assert wait_port(port, p), p.logs()
    yield port, files
    alive = p.poll() is None
    p.kill()
    p.finish()
    assert alive, "the origin exited during the tests\n" + p.logs()


def test_answers_small_files_and_404(origin):
    port, files = origin
    with util.Conn(port) as c:
        for target, status, body in (("/small", 200, SMALL),
                                     ("/4k.bin", 200, files["4k.bin"]),
                                     ("/64k.bin", 200, files["64k.bin"]),
                                     ("/missing", 404, b"not found\n")):
            c.request("GET", target)
            r = c.read_response()
            assert (r.status, r.body) == (status, body), target
            assert r.header("content-length") == str(len(body))
            assert r.header("date")
        c.request("HEAD", "/64k.bin")
        r = c.read_response("HEAD")
        assert r.status == 200 and r.header("content-length") == "65536" and r.body == b""
        # Still open: the HEAD answer carried no body bytes.
        c.request("GET", "/small")
        assert c.read_response().body == SMALL


def test_pipelined_requests_answered_in_order(origin):
    port, files = origin
    targets = ["/4k.bin", "/small", "/missing", "/64k.bin"] * 5
    data = b"".join(util.build_request("GET", t) for t in targets)
    with util.Conn(port) as c:
        c.send(data)
        for t in targets:
            r = c.read_response()
            want = SMALL if t == "/small" else files.get(t[1:], b"not found\n")
            assert r.body == want, t


def test_slow_reader_gets_every_byte(origin):
    """More than the socket buffers hold, read late: the origin waits for
    the socket to drain (partial writes), and nothing is lost or reordered."""
    port, files = origin
    n = 128  # 8 MiB: more than the origin's send buffer grows to (tcp_wmem)
    with util.Conn(port, timeout=10, rcvbuf=65536) as c:
        c.send(b"".join(util.build_request("GET", "/64k.bin") for _ in range(n)))
        time.sleep(0.5)
        for _ in range(n):
            assert c.read_response().body == files["64k.bin"]


@pytest.mark.parametrize("req", [
    util.build_request("GET", "/small", headers={"Connection": "close"}),
    util.build_request("GET", "/small", version="HTTP/1.0"),
])
def test_close_when_asked(origin, req):
    port, _ = origin
    r, closed, _ = util.raw_exchange(port, req)
    assert r.status == 200 and r.body == SMALL and closed


@pytest.mark.parametrize("req", [
    util.build_request("POST", "/small", body=b"abc"),
    util.build_request("GET", "/small", headers={"Transfer-Encoding": "chunked"}),
    b"BREW /small HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_refuses_what_it_does_not_serve(origin, req):
    """A body it would not read, another method: 400 and the connection
    closed, never a misframed answer."""
    port, _ = origin
    r, closed, _ = util.raw_exchange(port, req)
    assert r.status == 400 and closed


def test_content_length_zero_is_not_a_body(origin):
    port, _ = origin
    with util.Conn(port) as c:
        c.request("GET", "/small", headers={"Content-Length": "0"})
        assert c.read_response().body == SMALL
        c.request("GET", "/small")
        assert c.read_response().body == SMALL
