"""Hot reload (SIGHUP): a valid file takes over for new requests while
in-flight ones finish on the old config; listeners follow the file; an
invalid file changes nothing. The load test counts every unexpected status
and connection error while reloading 20 times: the count must be 0."""
import json
import signal
import socket
import threading
import time

import pytest

import util
from conftest import free_port, make_config


def ask(conn, target):
    conn.request("GET", target)
    return conn.read_response()


def write(portico_proc, cfg):
    portico_proc.config_path.write_text(json.dumps(cfg, indent=2))


def reload_and_wait(p, needle, before, timeout=5.0):
    """SIGHUP, then wait for the needle-th log line (counting from before)."""
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.stderr().count(needle) > before:
            return
        time.sleep(0.02)
    raise AssertionError("no %r in the log after SIGHUP:\n%s" % (needle, p.stderr()[-3000:]))


def test_reload_switches_routes(portico, upstream):
    a, b = upstream("echo.py", "--name", "a"), upstream("echo.py", "--name", "b")
    cfg = make_config(upstreams={"a": {"endpoints": [a.addr]}, "b": {"endpoints": [b.addr]}},
                      routes=[{"path": "/", "upstream": "a"}])
    p = portico(cfg)
    assert util.get(p.port, "/x").json()["server"] == "a"
    assert util.get(p.port, "/new/x").json()["server"] == "a"
    cfg["routes"] = [{"path": "/new/", "upstream": "b"}, {"path": "/", "upstream": "a"}]
    write(p, cfg)
    reload_and_wait(p, "reloaded", 0)
    assert util.get(p.port, "/new/x").json()["server"] == "b"
    assert util.get(p.port, "/x").json()["server"] == "a"


def test_keepalive_connection_follows_reload_between_requests(portico, upstream):
    a, b = upstream("echo.py", "--name", "a"), upstream("echo.py", "--name", "b")
    cfg = make_config(upstreams={"a": {"endpoints": [a.addr]}, "b": {"endpoints": [b.addr]}},
                      routes=[{"path": "/", "upstream": "a"}])
    p = portico(cfg)
    with util.Conn(p.port) as c:
        assert ask(c, "/x").json()["server"] == "a"
        cfg["routes"] = [{"path": "/", "upstream": "b"}]
        write(p, cfg)
        reload_and_wait(p, "reloaded", 0)
        assert ask(c, "/x").json()["server"] == "b"


def test_in_flight_request_finishes_on_old_config(portico, upstream):
    a, b = upstream("echo.py", "--name", "a"), upstream("echo.py", "--name", "b")
    cfg = make_config(upstreams={"a": {"endpoints": [a.addr]}, "b": {"endpoints": [b.addr]}},
                      routes=[{"path": "/", "upstream": "a"}])
    p = portico(cfg)
    result = {}

    def slow():
        result["r"] = util.get(p.port, "/slow/800", timeout=5.0)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    cfg["routes"] = [{"path": "/", "upstream": "b"}]
    write(p, cfg)
    reload_and_wait(p, "reloaded", 0)
    assert util.get(p.port, "/x").json()["server"] == "b"
    t.join(5)
    assert result["r"].status == 200
    assert result["r"].json()["server"] == "a"


def test_invalid_file_changes_nothing(portico, echo):
    cfg = make_config(upstreams={"e": {"endpoints": [echo.addr]}},
                      routes=[{"path": "/", "upstream": "e"}])
    p = portico(cfg)
    assert util.get(p.port, "/x").status == 200
    p.config_path.write_text('{ "listeners": [ { "address": ')
    reload_and_wait(p, "reload failed", 0)
    assert util.get(p.port, "/x").status == 200
    # A well-formed file with a semantic error: also refused, named.
    bad = make_config(port=p.port, upstreams={"e": {"endpoints": [echo.addr]}},
                      routes=[{"path": "/", "upstream": "nope"}])
    write(p, bad)
    reload_and_wait(p, "reload failed", 1)
    assert "routes[0].upstream" in p.stderr()
    assert util.get(p.port, "/x").status == 200
    assert p.poll() is None


def test_listeners_added_and_removed(portico, echo):
    port1, port2 = free_port(), free_port()
    cfg = make_config(port=port1, upstreams={"e": {"endpoints": [echo.addr]}},
                      routes=[{"path": "/", "upstream": "e"}], workers=2)
    p = portico(cfg)
    cfg["listeners"] = [{"address": "127.0.0.1:%d" % port2}, {"address": "127.0.0.1:%d" % port1}]
    write(p, cfg)
    reload_and_wait(p, "reloaded", 0)
    assert util.get(port2, "/x").status == 200
    assert util.get(port1, "/x").status == 200
    cfg["listeners"] = [{"address": "127.0.0.1:%d" % port2}]
    write(p, cfg)
    reload_and_wait(p, "reloaded", 1)
    assert util.get(port2, "/x").status == 200
    time.sleep(0.1)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port1), timeout=1).close()


def test_busy_new_listener_fails_the_reload(portico, echo):
    cfg = make_config(upstreams={"e": {"endpoints": [echo.addr]}},
                      routes=[{"path": "/", "upstream": "e"}])
    p = portico(cfg)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    busy = blocker.getsockname()[1]
    try:
        cfg["listeners"].append({"address": "127.0.0.1:%d" % busy})
        write(p, cfg)
        reload_and_wait(p, "reload failed", 0)
        assert util.get(p.port, "/x").status == 200
    finally:
        blocker.close()


def test_pooled_upstream_connections_survive_reload(portico, echo):
    cfg = make_config(upstreams={"e": {"endpoints": [echo.addr]}},
                      routes=[{"path": "/", "upstream": "e"}])
    p = portico(cfg)
    for _ in range(3):
        assert util.get(p.port, "/x").status == 200
    before = echo.stats()["connections"]
    cfg["routes"].insert(0, {"path": "/other/", "upstream": "e"})
    write(p, cfg)
    reload_and_wait(p, "reloaded", 0)
    for _ in range(3):
        assert util.get(p.port, "/x").status == 200
    assert echo.stats()["connections"] == before


def test_access_log_follows_reload(portico, echo, tmp_path):
    log1, log2 = tmp_path / "a1.log", tmp_path / "a2.log"
    cfg = make_config(upstreams={"e": {"endpoints": [echo.addr]}},
                      routes=[{"path": "/", "upstream": "e"}],
                      access_log={"path": str(log1), "format": "json"})
    p = portico(cfg)
    util.get(p.port, "/one")
    cfg["access_log"]["path"] = str(log2)
    write(p, cfg)
    reload_and_wait(p, "reloaded", 0)
    util.get(p.port, "/two")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and "/two" not in (log2.read_text() if log2.exists() else ""):
        time.sleep(0.05)
    assert "/one" in log1.read_text()
    assert "/two" in log2.read_text() and "/two" not in log1.read_text()


def test_twenty_reloads_under_load_no_error(portico, upstream):
    """Clients on keep-alive and fresh connections, 20 reloads, one of them
    changing the routes: every answer must be the expected 200."""
    a = upstream("echo.py", "--name", "a")
    base_routes = [{"path": "/", "upstream": "a"}]
    cfg = make_config(upstreams={"a": {"endpoints": [a.addr]}}, routes=base_routes, workers=2,
                      access_log={"path": "off"})
    p = portico(cfg)
    stop = threading.Event()
    errors, counts = [], {"ok": 0}
    lock = threading.Lock()

    def client(keepalive):
        conn = None
        while not stop.is_set():
            try:
                if keepalive:
                    if conn is None:
                        conn = util.Conn(p.port, timeout=5)
                    r = ask(conn, "/load")
                    if r.header("connection", "").lower() == "close":
                        conn.close()
                        conn = None
                else:
                    r = util.get(p.port, "/load", timeout=5)
                if r.status != 200:
                    with lock:
                        errors.append("status %d" % r.status)
                else:
                    with lock:
                        counts["ok"] += 1
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(repr(e))
                if conn is not None:
                    conn.close()
                    conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            time.sleep(0.1)
            routes = list(base_routes)
            if i % 5 == 4:  # a reload that changes the routes
                routes = [{"path": "/r%d/" % i, "upstream": "a"}] + base_routes
            cfg["routes"] = routes
            write(p, cfg)
            reload_and_wait(p, "reloaded", i)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert errors == [], "%d errors, first: %s" % (len(errors), errors[:5])
    assert counts["ok"] > 100
    assert util.get(p.port, "/r19/x").status == 200
    assert p.poll() is None
