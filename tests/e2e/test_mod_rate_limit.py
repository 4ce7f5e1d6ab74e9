"""rate_limit module: exact limits with the local backend (across worker
threads, several limits, missing key parts), and with real redis-server
processes started here: one combined limit for two Portico processes,
Redis killed and restarted, SCRIPT FLUSH, a paused Redis costing at most the
timeout, the over-limit memo (no Redis call for a key known to be over), a
client leaving while its request waits on Redis, and a Sentinel failover."""
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

import util
from conftest import Proc, free_port, make_config, wait_port

REDIS = shutil.which("redis-server")


@pytest.fixture(autouse=True)
def need_module(portico_bin):
    out = subprocess.run([portico_bin, "-V"], capture_output=True, timeout=10).stdout.decode()
    mods = [ln for ln in out.splitlines() if ln.lower().startswith("modules:")]
    if not mods or "rate_limit" not in mods[0].replace(",", " ").split():
        pytest.skip("rate_limit module not built in")


class Redis(Proc):
    """A real redis-server (or sentinel) on a free loopback port."""

    def __init__(self, tmp_path, port=None, extra=(), sentinel_conf=None):
        self.port = port or free_port()
        if sentinel_conf:
            argv = [REDIS, str(sentinel_conf), "--sentinel", "--port", str(self.port)]
        else:
            argv = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no"] + list(extra)
        super().__init__("redis-%d" % self.port, argv, tmp_path)
        if not wait_port(self.port, self.proc, what="redis"):
            raise RuntimeError("redis did not start\n" + self.logs())

    def cli(self, *args, timeout=5):
        p = subprocess.run(["redis-cli", "-p", str(self.port)] + [str(a) for a in args],
                           capture_output=True, timeout=timeout)
        return p.stdout.decode().strip()

    def cmdstat(self, name):
        """calls of a command from INFO commandstats (0 when never called)."""
        for line in self.cli("INFO", "commandstats").splitlines():
            if line.startswith("cmdstat_%s:" % name):
                return int(line.split("calls=")[1].split(",")[0])
        return 0


@pytest.fixture
def redis(request, tmp_path):
    if not REDIS:
        pytest.skip("redis-server not installed")
    started = []

    def start(**kw):
        r = Redis(tmp_path, **kw)
        started.append(r)
        return r

    yield start
    for r in started:
        r.kill()
        r.finish()


def rl_route(conf, path="/rl/", name="rl"):
    return [{"name": name, "path": path, "respond": {"status": 200, "body": "ok"},
             "filters": [{"rate_limit": conf}]}]


def start(portico, conf, redis_port=None, workers=1, redis_extra=None, routes=None):
    top = {"workers": workers}
    if redis_port:
        # A generous timeout: only the tests about timeouts use the 50 ms
        # default, so that a busy machine does not turn Redis into a fallback.
        top["redis"] = dict({"address": "127.0.0.1:%d" % redis_port, "timeout_ms": 1000},
                            **(redis_extra or {}))
    cfg = make_config(routes=routes or rl_route(conf), **top)
    return portico(cfg)


def hit(port, client="a", path="/rl/x", extra=None):
    hdrs = {"X-Client": client} if client is not None else {}
    hdrs.update(extra or {})
    return util.get(port, path, headers=hdrs)


def statuses(port, n, client="a", **kw):
    return [hit(port, client, **kw).status for _ in range(n)]


def uniq():
    return "c-%d-%d" % (os.getpid(), time.monotonic_ns())


# ---- local backend --------------------------------------------------------


def test_local_exact_then_recovers(portico):
    p = start(portico, {"key": "header:X-Client", "rate": "5/2s", "headers": True})
    got = statuses(p.port, 8)
    assert got == [200] * 5 + [429] * 3, got
    r = hit(p.port)
    assert r.status == 429
    assert r.header("Content-Type") == "application/json"
    assert r.json()["error"] == "rate_limited"
    assert 1 <= int(r.header("Retry-After")) <= 1          # 400 ms, rounded up
    assert r.header("RateLimit-Limit") == "5"
    assert r.header("RateLimit-Remaining") == "0"
    assert r.header("RateLimit-Policy") == "5;w=2"
    assert 1 <= int(r.header("RateLimit-Reset")) <= 2
    ok = hit(p.port, "other")
    assert ok.status == 200
    assert ok.header("RateLimit-Remaining") == "4"          # headers: true on allowed answers
    time.sleep(0.45)                                        # one interval (400 ms)
    assert statuses(p.port, 2) == [200, 429]
    time.sleep(2.05)                                        # the whole burst back
    assert statuses(p.port, 6) == [200] * 5 + [429]


def test_local_exact_across_workers(portico):
    """Four workers, 16 concurrent clients, one key: exactly the burst passes."""
    p = start(portico, {"key": "const:all", "rate": "20/m"}, workers=4)
    results = []
    lock = threading.Lock()

    def client():
        for _ in range(5):
            st = hit(p.port, None).status
            with lock:
                results.append(st)

    ts = [threading.Thread(target=client) for _ in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results.count(200) == 20 and results.count(429) == 60, results


def test_no_headers_on_allowed_by_default(portico):
    p = start(portico, {"key": "ip", "rate": "5/s"})
    r = hit(p.port)
    assert r.status == 200 and r.header("RateLimit-Limit") is None


def test_several_limits_checked_together(portico):
    """Per user 3/min, and the route 5/min overall: a refusal charges
    nothing, so user b still gets the route's last two."""
    p = start(portico, {"limits": [{"key": "header:X-Client", "rate": "3/m"},
                                   {"key": "route", "rate": "5/m"}], "headers": True})
    assert statuses(p.port, 5, "a") == [200, 200, 200, 429, 429]
    r = hit(p.port, "b")
    assert r.status == 200
    assert r.header("RateLimit-Remaining") == "1"           # the route's, the tighter one
    assert r.header("RateLimit-Policy") == "3;w=60, 5;w=60"
    assert statuses(p.port, 3, "b") == [200, 429, 429]
    assert statuses(p.port, 1, "c") == [429]                 # route exhausted


def test_missing_part_skip_and_fallback(portico):
    routes = (rl_route({"key": "header:X-Client", "rate": "2/m", "on_missing": "skip"},
                       path="/skip/", name="skip") +
              rl_route({"key": "header:X-Client", "rate": "2/m"}, path="/fb/", name="fb") +
              rl_route({"key": "jwt:sub", "rate": "2/m", "on_missing": "fallback",
                        "fallback_key": "header:X-Client"}, path="/jwt/", name="jwt"))
    p = start(portico, None, routes=routes)
    # skip: without the header the limit does not apply
    assert statuses(p.port, 4, None, path="/skip/x") == [200] * 4
    assert statuses(p.port, 3, "k", path="/skip/x") == [200, 200, 429]
    # fallback (default: "ip"): without the header the client address counts
    assert statuses(p.port, 3, None, path="/fb/x") == [200, 200, 429]
    assert statuses(p.port, 1, "k", path="/fb/x") == [200]   # its own bucket
    # no jwt_auth on this route: jwt:sub is missing, X-Client is used
    assert statuses(p.port, 3, "j1", path="/jwt/x") == [200, 200, 429]
    assert statuses(p.port, 1, "j2", path="/jwt/x") == [200]


def test_proxied_route_and_access_log(portico, upstream):
    e = upstream("echo.py")
    cfg = make_config(upstreams={"echo": {"endpoints": [e.addr]}},
                      routes=[{"path": "/", "upstream": "echo",
                               "filters": [{"rate_limit": {"key": "ip", "rate": "2/m"}}]}])
    p = portico(cfg)
    r = util.get(p.port, "/a")
    assert r.status == 200 and r.json()["target"] == "/a"
    assert [util.get(p.port, "/a").status for _ in range(2)] == [200, 429]
    assert e.stats()["requests"] == 2                        # the refusal never went upstream
    assert util.wait_until(lambda: '"rate_limit":"limited"' in p.stdout(), 2)


def test_config_errors_name_the_path(portico_bin, tmp_path):
    cfg = make_config(routes=rl_route({"key": "header:", "rate": "5/s"}))
    path = tmp_path / "bad.json"
    import json
    path.write_text(json.dumps(cfg))
    out = subprocess.run([portico_bin, "-t", "-c", str(path)], capture_output=True, timeout=10)
    text = (out.stdout + out.stderr).decode()
    assert out.returncode == 1
    assert "routes[0].filters[0].rate_limit.key:" in text, text
    cfg = make_config(routes=rl_route({"key": "ip", "rate": "5/s"}),
                      redis={"address": "redis.example:6379", "password": "hunter2"})
    path.write_text(json.dumps(cfg))
    out = subprocess.run([portico_bin, "-t", "-c", str(path)], capture_output=True, timeout=10)
    text = (out.stdout + out.stderr).decode()
    assert out.returncode == 1 and "redis.address:" in text, text
    assert "hunter2" not in text


# ---- Redis backend --------------------------------------------------------


def test_redis_exact_then_recovers(portico, redis):
    rd = redis()
    p = start(portico, {"key": "header:X-Client", "rate": "5/2s"}, rd.port)
    c = uniq()
    assert statuses(p.port, 7, c) == [200] * 5 + [429] * 2
    keys = rd.cli("KEYS", "*").split()
    assert len(keys) == 1 and keys[0].startswith("portico:rl:{"), keys
    assert c not in keys[0]                                  # the key is hashed
    ttl = int(rd.cli("PTTL", keys[0]))
    assert 0 < ttl <= 2000                                   # gone once fully recovered
    time.sleep(0.45)
    assert statuses(p.port, 2, c) == [200, 429]
    assert util.wait_until(lambda: '"rate_limit":"allowed"' in p.stdout(), 2)
    assert "fallback" not in p.stdout()
    # answers decided after Redis replied (the request was paused) log the
    # bytes that went out, like any other
    entries = [json.loads(ln) for ln in p.stdout().splitlines() if ln.startswith("{")]
    refused = [e for e in entries if e.get("status") == 429]
    assert refused and all(e["bytes_out"] > 100 for e in refused), refused


def test_two_instances_share_one_limit(portico, redis):
    rd = redis()
    conf = {"key": "header:X-Client", "rate": "10/m"}
    a = start(portico, conf, rd.port, workers=2)
    b = start(portico, conf, rd.port, workers=2)
    c = uniq()
    got = [hit((a if i % 2 else b).port, c).status for i in range(30)]
    assert got.count(200) == 10, got
    assert got[:10] == [200] * 10


def test_many_keys_each_their_own_bucket(portico, redis):
    """More keys than the per-thread digest cache has slots (256): a slot
    shared by two keys must never hand one key the other's Redis bucket."""
    rd = redis()
    p = start(portico, {"key": "header:X-Client", "rate": "1/h"}, rd.port)
    base = uniq()
    clients = ["%s-%d" % (base, i) for i in range(600)]
    with util.Conn(p.port) as c:
        for rnd, want in ((1, 200), (2, 429)):
            got = []
            for cl in clients:
                c.request("GET", "/rl/x", headers={"X-Client": cl})
                got.append(c.read_response().status)
            assert got == [want] * len(clients), (rnd, [i for i, s in enumerate(got) if s != want])
    assert int(rd.cli("DBSIZE")) == len(clients)


def test_memo_spares_redis(portico, redis):
    rd = redis()
    p = start(portico, {"key": "header:X-Client", "rate": "3/m"}, rd.port)
    c = uniq()
    assert statuses(p.port, 4, c) == [200, 200, 200, 429]
    before = rd.cmdstat("evalsha")
    assert statuses(p.port, 20, c) == [429] * 20
    assert rd.cmdstat("evalsha") == before                  # 0 Redis calls for a known-over key
    assert util.wait_until(lambda: '"rate_limit":"limited_memo"' in p.stdout(), 2)
    # a key under its limit costs exactly one call per request
    before = rd.cmdstat("evalsha")
    statuses(p.port, 2, uniq())
    assert rd.cmdstat("evalsha") == before + 2


def test_redis_killed_then_restarted_and_flushed(portico, redis, tmp_path):
    rd = redis()
    port = rd.port
    p = start(portico, {"key": "header:X-Client", "rate": "3/m"}, rd.port,
              redis_extra={"reconnect_max_ms": 200})
    c = uniq()
    assert statuses(p.port, 4, c) == [200, 200, 200, 429]
    rd.kill()
    # Redis gone: the local fallback serves, and limits still hold locally
    c2 = uniq()
    got = statuses(p.port, 5, c2)
    assert got == [200, 200, 200, 429, 429], got
    assert util.wait_until(lambda: "connection lost" in p.stderr() or
                           "cannot connect" in p.stderr(), 2), p.stderr()
    # logged once for the episode, not per request
    assert p.stderr().count("on_redis_error applies") == 1, p.stderr()
    rd2 = redis(port=port)                                    # a new, empty Redis: no scripts
    assert util.wait_until(lambda: "answers again" in p.stderr(), 5), p.stderr()
    c3 = uniq()
    assert statuses(p.port, 4, c3) == [200, 200, 200, 429]
    assert rd2.cmdstat("evalsha") >= 4                        # decided by Redis again
    assert rd2.cli("KEYS", "*") != ""
    # SCRIPT FLUSH: NOSCRIPT is answered by one EVAL, then EVALSHA again
    rd2.cli("SCRIPT", "FLUSH")
    c4 = uniq()
    assert statuses(p.port, 4, c4) == [200, 200, 200, 429]
    assert rd2.cmdstat("eval") == 1
    time.sleep(0.3)                                           # the access log is flushed
    assert p.stdout().count('"rate_limit":"fallback_local"') == 5   # only while Redis was away


def test_paused_redis_costs_at_most_the_timeout(portico, redis):
    rd = redis()
    p = start(portico, {"key": "header:X-Client", "rate": "100/m"}, rd.port,
              redis_extra={"timeout_ms": 50})
    assert hit(p.port, uniq()).status == 200                  # connected
    subprocess.Popen(["redis-cli", "-p", str(rd.port), "CLIENT", "PAUSE", "1500", "ALL"],
                     stdout=subprocess.DEVNULL).wait(5)
    times = []
    for _ in range(10):
        t0 = time.monotonic()
        assert hit(p.port, uniq()).status == 200
        times.append(time.monotonic() - t0)
    # the first waits for the timeout; the others do not wait for Redis at
    # all (bounds far below the 1.5 s pause, loose for a busy machine)
    assert times[0] >= 0.045 and times[0] < 1.0, times
    assert max(times[1:]) < 0.5, times
    assert util.wait_until(lambda: "no answer within timeout_ms" in p.stderr(), 2)
    # after the pause, Redis decides again
    assert util.wait_until(lambda: "answers again" in p.stderr(), 5), p.stderr()
    before = rd.cmdstat("evalsha")
    assert hit(p.port, uniq()).status == 200
    assert rd.cmdstat("evalsha") == before + 1


def test_on_redis_error_deny_and_allow(portico, redis):
    rd = redis()
    routes = (rl_route({"key": "ip", "rate": "1/m", "on_redis_error": "deny"}, "/deny/", "d") +
              rl_route({"key": "ip", "rate": "1/m", "on_redis_error": "allow"}, "/allow/", "a"))
    p = start(portico, None, rd.port, routes=routes)
    assert hit(p.port, path="/deny/x").status == 200
    rd.kill()
    time.sleep(0.1)
    r = hit(p.port, path="/deny/x")
    assert r.status == 503 and r.json()["error"] == "rate_limit_unavailable"
    assert statuses(p.port, 3, path="/allow/x") == [200] * 3


def test_client_gone_while_waiting(portico, redis):
    """Requests wait on a paused Redis; their clients leave; nothing breaks."""
    rd = redis()
    p = start(portico, {"key": "header:X-Client", "rate": "100/m"}, rd.port,
              redis_extra={"timeout_ms": 300})
    assert hit(p.port, uniq()).status == 200
    rd.cli("CLIENT", "PAUSE", "600", "ALL")
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", p.port))
        s.sendall(b"GET /rl/x HTTP/1.1\r\nHost: t\r\nX-Client: gone\r\n\r\n")
        s.close()
    time.sleep(0.8)
    assert hit(p.port, uniq()).status == 200
    assert p.poll() is None


# ---- Sentinel -------------------------------------------------------------


def test_sentinel_failover_followed(portico, redis, tmp_path):
    m = redis()
    rep = redis(extra=["--replicaof", "127.0.0.1", str(m.port)])
    assert util.wait_until(lambda: "master_link_status:up" in rep.cli("INFO", "replication"), 10)
    sport = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text("port %d\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 %d 1\n"
                    "sentinel down-after-milliseconds mymaster 400\n"
                    "sentinel failover-timeout mymaster 2000\n" % (sport, m.port))
    s = redis(port=sport, sentinel_conf=conf)
    cfg = make_config(routes=rl_route({"key": "header:X-Client", "rate": "3/m"}),
                      redis={"sentinels": ["127.0.0.1:%d" % sport], "master_name": "mymaster",
                             "reconnect_max_ms": 200, "timeout_ms": 1000})
    p = portico(cfg)
    c = uniq()
    # the first request waits for the sentinel's answer, then the master's
    assert statuses(p.port, 4, c) == [200, 200, 200, 429]
    assert m.cmdstat("evalsha") == 4
    assert "on_redis_error" not in p.stderr()
    # a master the sentinels do not know, and a sentinel that is not there:
    # the waiting requests fall back, nothing hangs
    for red in ({"sentinels": ["127.0.0.1:%d" % sport], "master_name": "nosuch"},
                {"sentinels": ["127.0.0.1:%d" % free_port()], "master_name": "mymaster"}):
        q = portico(make_config(routes=rl_route({"key": "header:X-Client", "rate": "2/m"}),
                                redis=red))
        assert statuses(q.port, 3, uniq()) == [200, 200, 429]
        assert util.wait_until(lambda: "does not know the master" in q.stderr() or
                               "cannot reach a sentinel" in q.stderr(), 2), q.stderr()
    m.kill()
    new = util.wait_until(
        lambda: s.cli("SENTINEL", "get-master-addr-by-name", "mymaster").split() ==
        ["127.0.0.1", str(rep.port)], 15)
    assert new, s.cli("SENTINEL", "get-master-addr-by-name", "mymaster")
    assert util.wait_until(lambda: (hit(p.port, uniq()).status == 200 and
                                    rep.cmdstat("evalsha") > 0), 10)
    c2 = uniq()
    assert statuses(p.port, 4, c2) == [200, 200, 200, 429]
    assert any(k.startswith("portico:rl:") for k in rep.cli("KEYS", "*").split())


def test_auth_and_db(portico, redis):
    rd = redis(extra=["--requirepass", "s3cret-pw"])
    p = start(portico, {"key": "header:X-Client", "rate": "2/m"}, rd.port,
              redis_extra={"password": "s3cret-pw", "db": 2})
    assert statuses(p.port, 3, uniq()) == [200, 200, 429]
    keys = subprocess.run(["redis-cli", "-p", str(rd.port), "-a", "s3cret-pw", "--no-auth-warning",
                           "-n", "2", "KEYS", "*"], capture_output=True, timeout=5).stdout.split()
    assert len(keys) == 1 and keys[0].startswith(b"portico:rl:{"), keys
    # a wrong password: refused by Redis, the fallback serves, never logged
    q = start(portico, {"key": "header:X-Client", "rate": "2/m"}, rd.port,
              redis_extra={"password": "wrong-pw"})
    assert statuses(q.port, 3, uniq()) == [200, 200, 429]
    assert util.wait_until(lambda: "AUTH refused" in q.stderr(), 2), q.stderr()
    assert "wrong-pw" not in q.stderr() and "wrong-pw" not in q.stdout()


def test_unix_socket(portico, redis, tmp_path):
    sock = tmp_path / "redis.sock"
    rd = redis(extra=["--unixsocket", str(sock), "--unixsocketperm", "700"])
    cfg = make_config(routes=rl_route({"key": "header:X-Client", "rate": "2/m"}),
                      redis={"address": "unix:%s" % sock, "timeout_ms": 1000})
    p = portico(cfg)
    assert statuses(p.port, 3, uniq()) == [200, 200, 429]
    assert rd.cmdstat("evalsha") == 3


def test_redis_absent_from_the_start(portico):
    """Nothing listens at the address: the local fallback decides, the
    trouble is logged once, and no request waits for it."""
    p = start(portico, {"key": "header:X-Client", "rate": "3/m"}, free_port(), workers=2,
              redis_extra={"reconnect_min_ms": 20, "reconnect_max_ms": 50})
    t0 = time.monotonic()
    got = statuses(p.port, 5, uniq())
    assert got == [200, 200, 200, 429, 429], got
    assert time.monotonic() - t0 < 2
    time.sleep(0.5)                                           # several reconnect attempts
    assert p.stderr().count("on_redis_error applies") == 1, p.stderr()


def test_stopped_redis_connection_replaced(portico, redis):
    """A Redis that stops answering without closing (SIGSTOP): requests go
    on under the fallback without waiting, the silent connection is
    replaced, and when Redis runs again it decides again."""
    rd = redis()
    p = start(portico, {"key": "header:X-Client", "rate": "100/m"}, rd.port,
              redis_extra={"timeout_ms": 50, "connect_timeout_ms": 200,
                           "reconnect_min_ms": 50, "reconnect_max_ms": 100})
    assert hit(p.port, uniq()).status == 200
    conns0 = int(rd.cli("INFO", "stats").split("total_connections_received:")[1].split()[0])
    rd.signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        for _ in range(20):
            assert hit(p.port, uniq()).status == 200
            time.sleep(0.05)
        assert time.monotonic() - t0 < 3
    finally:
        rd.signal(signal.SIGCONT)
    assert util.wait_until(lambda: "answers again" in p.stderr(), 5), p.stderr()
    conns1 = int(rd.cli("INFO", "stats").split("total_connections_received:")[1].split()[0])
    assert conns1 > conns0 + 1, (conns0, conns1)     # reconnected (redis-cli counts one)
    before = rd.cmdstat("evalsha")
    assert statuses(p.port, 2, uniq()) == [200, 200]
    assert rd.cmdstat("evalsha") == before + 2


def test_ip_key_honours_trusted_proxies_only(portico):
    """Behind a trusted proxy the client is the X-Forwarded-For address;
    from an untrusted peer the header changes nothing."""
    routes = rl_route({"key": "ip", "rate": "2/m"})
    trusted = portico(make_config(routes=routes, trusted_proxies=["127.0.0.1"]))
    xff = lambda a: {"X-Forwarded-For": a}
    assert statuses(trusted.port, 3, None, extra=xff("203.0.113.7")) == [200, 200, 429]
    assert statuses(trusted.port, 1, None, extra=xff("203.0.113.8")) == [200]
    untrusted = portico(make_config(routes=routes))
    assert statuses(untrusted.port, 1, None, extra=xff("203.0.113.7")) == [200]
    assert statuses(untrusted.port, 2, None, extra=xff("203.0.113.9")) == [200, 429]


# ---- batches: the requests of one loop turn in one script call -------------


def burst(port, n, client, path="/rl/x", extra=None, timeout=10):
    """n requests sent at once on n connections (all written before any is
    read, so one worker sees many in one loop turn): their status codes, 0
    for a connection closed without an answer."""
    req = one_request(client, path, extra)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=timeout) for _ in range(n)]
    for s in socks:
        s.sendall(req)
    return read_codes(socks)


def one_request(client, path="/rl/x", extra=None):
    """A GET from client with Connection: close, as bytes."""
    hdr = "".join("%s: %s\r\n" % kv for kv in (extra or {}).items())
    return ("GET %s HTTP/1.1\r\nHost: t\r\nX-Client: %s\r\n%sConnection: close\r\n\r\n"
            % (path, client, hdr)).encode()


def read_codes(socks):
    """Each socket read to its end and closed: the status codes, 0 for a
    connection closed without an answer."""
    codes = []
    for s in socks:
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        s.close()
        codes.append(int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0)
    return codes


def rl_script():
    """RL_SCRIPT as compiled into the module (from its source)."""
    src = open(os.path.join(os.path.dirname(__file__), "..", "..", "modules",
                            "rate_limit.c")).read()
    body = src.split("static const char RL_SCRIPT[] =", 1)[1].split(";\n", 1)[0]
    lits = re.findall(r'"((?:[^"\\]|\\.)*)"', body)
    return "".join(lits).encode().decode("unicode_escape")


def run_script_against_model(rd, sha, keys, pols, reqs):
    """One call of the batched script deciding reqs (per request, a list of
    (key index, policy index)) against a model of rate_limit_gcra.h applied
    request after request, every key starting recovered. Returns each key's
    TAT ahead of now (ns) in the model after the batch."""
    plan = b"".join(bytes([len(r)]) + b"".join(struct.pack(">HH", k + 1, p + 1) for k, p in r)
                    for r in reqs)
    args = [str(len(keys))] + keys + [str(len(pols))]
    for iv, b in pols:
        args += [iv, str(b)]
    argv = ["redis-cli", "-p", str(rd.port), "-x", "EVALSHA", sha] + args
    out = subprocess.run(argv, input=plan, capture_output=True, timeout=5).stdout.decode().split()
    got = [int(x) for x in out]
    # the model: ahead = TAT - now (ns)
    ahead = [0] * len(keys)
    want = []
    for r in reqs:
        ok = all(ahead[k] + float(pols[p][0]) * 1000 <= float(pols[p][0]) * 1000 * pols[p][1]
                 for k, p in r)
        for k, p in r:
            want.append(ahead[k] if ok else -1 - ahead[k])
            if ok:
                ahead[k] += int(float(pols[p][0]) * 1000)
    assert len(got) == len(want)
    # Redis' clock moves between the model's instants only within the call:
    # the script reads TIME once, so the answers are exact
    assert got == want, (got, want)
    # charged keys expire at their full recovery, the others are not written
    for k in range(len(keys)):
        pttl = int(rd.cli("PTTL", keys[k]))
        if ahead[k]:
            assert 0 < pttl <= ahead[k] // 1000000 + 1, (k, pttl, ahead[k])
            # stored as a whole number of microseconds, to the microsecond
            stored = int(rd.cli("GET", keys[k]))
            now_us = int(rd.cli("TIME").split()[0]) * 1000000
            assert abs(stored - (now_us + ahead[k] // 1000)) < 5 * 1000000, (stored, now_us)
        else:
            assert pttl == -2
    return ahead


def test_script_decides_a_batch_as_one_call_each(redis):
    """The batched script against a model of rate_limit_gcra.h applied
    request after request: a hot key shared by many requests, requests with
    two keys where one refuses (nothing charged), a named bucket used under
    two policies, and the answer's encoding (rate_limit_batch.h)."""
    rd = redis()
    sha = rd.cli("SCRIPT", "LOAD", rl_script())
    assert len(sha) == 40, sha
    # policies: (interval_us, burst): 1 s x 3, 0.5 s x 2, 1 ms x 1000
    pols = [("1000000.000", 3), ("500000.000", 2), ("1000.000", 1000)]
    keys = ["t:{a}:x", "t:{b}:y", "t:{c}:z"]
    rng = random.Random(7)
    reqs = []
    for _ in range(40):
        n = rng.choice([1, 1, 2, 3])
        ks = rng.sample(range(3), n)
        reqs.append([(k, rng.randrange(3)) for k in ks])
    run_script_against_model(rd, sha, keys, pols, reqs)
    # the probe (no keys, no arguments) is answered
    assert rd.cli("EVALSHA", sha, "0") == ""


def test_script_one_key_one_policy_batch(redis):
    """A batch naming one key under one policy (the script's shorter way):
    the same answers as the model, including a request naming the key
    twice (two identical limits) and refusals that charge nothing; a second
    call reads back what the first stored."""
    rd = redis()
    sha = rd.cli("SCRIPT", "LOAD", rl_script())
    pols = [("1000000.000", 5)]
    keys = ["t:{one}:k"]
    reqs = [[(0, 0)], [(0, 0), (0, 0)], [(0, 0)], [(0, 0)], [(0, 0)], [(0, 0), (0, 0)]]
    ahead = run_script_against_model(rd, sha, keys, pols, reqs)
    assert ahead[0] == 5 * 10**9                      # 5 charged, then refusals
    # the next call starts from the stored TAT: all refused, nothing charged
    plan = bytes([1, 0, 1, 0, 1]) * 3
    argv = ["redis-cli", "-p", str(rd.port), "-x", "EVALSHA", sha, "1", keys[0], "1",
            pols[0][0], str(pols[0][1])]
    out = [int(x) for x in subprocess.run(argv, input=plan, capture_output=True,
                                          timeout=5).stdout.decode().split()]
    assert len(out) == 3 and out[0] == out[1] == out[2], out
    assert 4.9e9 < -1 - out[0] <= 5e9, out             # the clock moved a little
    assert abs(int(rd.cli("PTTL", keys[0])) - 5000) < 100


def test_concurrent_requests_batched_and_exact(portico, redis):
    """Requests arriving together on many connections are decided in
    batches (fewer Redis calls than requests) and the limit stays exact."""
    rd = redis()
    p = start(portico, {"key": "header:X-Client", "rate": "25/m"}, rd.port)
    assert hit(p.port, uniq()).status == 200                  # connected
    c = uniq()
    before = rd.cmdstat("evalsha")
    codes = []
    for _ in range(4):
        codes += burst(p.port, 30, c)
    calls = rd.cmdstat("evalsha") - before
    assert codes.count(200) == 25 and codes.count(429) == 95, codes
    # one call per request at most, and batches did form (120 requests)
    assert 0 < calls < 120, calls
    assert "fallback" not in p.stdout() and "on_redis_error" not in p.stderr()


def test_batched_requests_with_two_limits_exact(portico, redis):
    """Per-client limits and one route-wide limit, many clients at once: no
    client above its own limit, and the route's total exact (a refused
    request charges neither)."""
    rd = redis()
    conf = {"limits": [{"key": "header:X-Client", "rate": "10/m"},
                       {"key": "route", "rate": "25/m"}]}
    p = start(portico, conf, rd.port, workers=2)
    tag = uniq()
    results = {}

    def client(i):
        results[i] = burst(p.port, 15, "%s-%d" % (tag, i))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4
    assert all(r.count(200) <= 10 for r in results.values()), results
    assert sum(r.count(200) for r in results.values()) == 25, results
    assert all(set(r) <= {200, 429} for r in results.values()), results


def test_noscript_resends_the_whole_batch(portico, redis):
    rd = redis()
    p = start(portico, {"key": "header:X-Client", "rate": "10/m"}, rd.port)
    assert hit(p.port, uniq()).status == 200
    rd.cli("SCRIPT", "FLUSH")
    codes = burst(p.port, 30, uniq())
    assert codes.count(200) == 10 and codes.count(429) == 20, codes
    assert 1 <= rd.cmdstat("eval") <= 30                      # one EVAL per batch that met NOSCRIPT
    assert "fallback" not in p.stdout()


def test_redis_killed_while_batches_wait(portico, redis):
    """Batches in flight when Redis dies: every request gets exactly one
    answer (on_redis_error), none hangs, and the restarted Redis decides
    again."""
    rd = redis()
    port = rd.port
    p = start(portico, {"key": "header:X-Client", "rate": "100/m", "on_redis_error": "deny"},
              rd.port, workers=2, redis_extra={"timeout_ms": 3000, "reconnect_max_ms": 200})
    assert hit(p.port, uniq()).status == 200
    rd.cli("CLIENT", "PAUSE", "5000", "ALL")
    out = []
    t = threading.Thread(target=lambda: out.extend(burst(p.port, 40, uniq(), timeout=8)))
    t.start()
    time.sleep(0.5)                                           # the batches are in flight
    rd.kill()
    t.join(10)
    assert not t.is_alive()
    assert out == [503] * 40, out                              # each answered once, denied
    rd2 = redis(port=port)
    assert util.wait_until(lambda: "answers again" in p.stderr(), 5), p.stderr()
    c = uniq()
    assert statuses(p.port, 3, c) == [200, 200, 200]
    assert rd2.cmdstat("evalsha") + rd2.cmdstat("eval") >= 1
    assert p.poll() is None


def test_clients_leave_while_their_batch_waits(portico, redis):
    """Half of a batch's clients leave while Redis is paused; the others
    get their answers when it resumes, decided by Redis."""
    rd = redis()
    p = start(portico, {"key": "header:X-Client", "rate": "5/m"}, rd.port,
              redis_extra={"timeout_ms": 3000})
    assert hit(p.port, uniq()).status == 200
    rd.cli("CLIENT", "PAUSE", "700", "ALL")
    c = uniq()
    req = ("GET /rl/x HTTP/1.1\r\nHost: t\r\nX-Client: %s\r\nConnection: close\r\n\r\n"
           % c).encode()
    gone = [socket.create_connection(("127.0.0.1", p.port)) for _ in range(10)]
    stay = [socket.create_connection(("127.0.0.1", p.port), timeout=5) for _ in range(10)]
    for s in gone + stay:
        s.sendall(req)
    time.sleep(0.1)
    for s in gone:
        s.close()
    codes = []
    for s in stay:
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        codes.append(int(data.split(b" ", 2)[1]))
    # Redis decided all 20 (those that left were charged too, as they were
    # allowed before they left): at most 5 of the 10 still there passed
    assert set(codes) <= {200, 429} and codes.count(200) <= 5, codes
    assert "fallback" not in p.stdout()
    assert hit(p.port, uniq()).status == 200
    assert p.poll() is None


def test_batch_max_bounds_a_call(portico, redis):
    """batch_max 1: one call per request, as without batching; batch_max 3:
    at least one call per three requests. The limit stays exact either way."""
    rd = redis()
    for bmax, least in ((1, 40), (3, 14)):
        p = start(portico, {"key": "header:X-Client", "rate": "50/m"}, rd.port,
                  redis_extra={"batch_max": bmax})
        assert hit(p.port, uniq()).status == 200
        before = rd.cmdstat("evalsha")
        c = uniq()
        codes = burst(p.port, 20, c) + burst(p.port, 20, c)   # all under the limit
        calls = rd.cmdstat("evalsha") - before
        assert codes == [200] * 40, (bmax, codes)
        assert least <= calls <= 40, (bmax, calls)
        codes = burst(p.port, 20, c)
        assert codes.count(200) == 10 and codes.count(429) == 10, (bmax, codes)


def sent_apart(port, n, client, gap):
    """n requests, each on its own connection, gap seconds apart (one loop
    turn each): the open sockets, to be read with read_codes."""
    req = one_request(client)
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(req)
        socks.append(s)
        time.sleep(gap)
    return socks


def test_max_calls_in_flight_holds_batches(portico, redis):
    """Requests arriving one loop turn apart while a call waits on Redis:
    with max_calls_in_flight 1 they wait together for it to land and go
    out as one call; with 0 (no cap) each turn sends its own. The limit is
    exact either way."""
    rd = redis()
    for cap, calls_expected in ((1, 2), (0, 8)):
        p = start(portico, {"key": "header:X-Client", "rate": "5/m"}, rd.port,
                  redis_extra={"timeout_ms": 3000, "max_calls_in_flight": cap})
        assert hit(p.port, uniq()).status == 200              # connected
        before = rd.cmdstat("evalsha")                        # (INFO waits out a pause)
        rd.cli("CLIENT", "PAUSE", "600", "ALL")
        codes = read_codes(sent_apart(p.port, 8, uniq(), 0.03))
        assert sorted(codes) == [200] * 5 + [429] * 3, (cap, codes)
        assert rd.cmdstat("evalsha") - before == calls_expected, cap
        assert "fallback" not in p.stdout() and "on_redis_error" not in p.stderr()
        p.stop()


def test_held_requests_fall_back_within_the_timeout(portico, redis):
    """A request held behind a call that never lands waits no longer than
    timeout_ms from its own arrival, then takes on_redis_error."""
    rd = redis()
    p = start(portico, {"key": "header:X-Client", "rate": "100/m", "on_redis_error": "allow"},
              rd.port, redis_extra={"timeout_ms": 300, "max_calls_in_flight": 1})
    assert hit(p.port, uniq()).status == 200
    rd.cli("CLIENT", "PAUSE", "3000", "ALL")
    t0 = time.monotonic()
    socks = sent_apart(p.port, 3, uniq(), 0.1)                 # the first is in flight
    codes = read_codes(socks)
    took = time.monotonic() - t0
    assert codes == [200, 200, 200], codes
    # all three answered when the first call timed out (0.3 s), long
    # before the pause ends (3 s); loose bounds for a busy machine
    assert 0.25 <= took < 1.5, took
    assert util.wait_until(lambda: "no answer within timeout_ms" in p.stderr(), 2)
    assert p.poll() is None


class DelayLine:
    """A TCP relay to Redis that holds every chunk sent to Redis for delay
    seconds from its arrival (chunks in parallel, not one after another);
    answers come back at once. A round trip then takes at least delay."""

    def __init__(self, redis_port, delay):
        self.delay, self.redis_port = delay, redis_port
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            r = socket.create_connection(("127.0.0.1", self.redis_port))
            q = queue.Queue()
            threading.Thread(target=self._read, args=(c, q), daemon=True).start()
            threading.Thread(target=self._send_late, args=(q, r, c), daemon=True).start()
            threading.Thread(target=self._pump, args=(r, c), daemon=True).start()

    def _read(self, c, q):
        while True:
            try:
                data = c.recv(65536)
            except OSError:
                data = b""
            q.put((time.monotonic(), data))
            if not data:
                return

    def _send_late(self, q, r, c):
        while True:
            t, data = q.get()
            time.sleep(max(0.0, t + self.delay - time.monotonic()))
            if not data:
                r.close()
                return
            try:
                r.sendall(data)
            except OSError:
                c.close()
                return

    @staticmethod
    def _pump(src, dst):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                dst.close()
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def stop(self):
        self.stopped = True
        self.lsock.close()


def test_full_batches_go_out_despite_the_cap(portico, redis):
    """max_calls_in_flight 1 holds only a batch that can still grow: with
    batch_max 2, twenty requests at once make ten batches; the full ones
    go out together instead of one per round trip, so with a round trip of
    80 ms all twenty are decided by Redis within the 400 ms timeout (ten
    round trips one after another would take 800 ms)."""
    rd = redis()
    relay = DelayLine(rd.port, 0.08)
    try:
        p = start(portico, {"key": "header:X-Client", "rate": "100/m",
                            "on_redis_error": "allow"},
                  relay.port, redis_extra={"timeout_ms": 400, "batch_max": 2,
                                           "max_calls_in_flight": 1})
        assert hit(p.port, uniq()).status == 200              # connected
        before = rd.cmdstat("evalsha")
        t0 = time.monotonic()
        codes = burst(p.port, 20, uniq())
        took = time.monotonic() - t0
        assert codes == [200] * 20, codes
        assert "no answer within timeout_ms" not in p.stderr(), p.stderr()
        assert util.wait_until(lambda: p.stdout().count('"rate_limit":"allowed"') >= 21, 2)
        assert "fallback" not in p.stdout()
        assert 10 <= rd.cmdstat("evalsha") - before <= 20
        assert took < 2, took
    finally:
        relay.stop()


def test_batch_linger_gathers_requests_behind_a_call(portico, redis):
    """batch_linger_us: a request that finds no call in flight goes at
    once; requests arriving while one is in flight wait up to the linger
    from the first of them and go out together."""
    rd = redis()
    for linger, calls_expected in ((100000, 2), (0, 5)):
        p = start(portico, {"key": "header:X-Client", "rate": "100/m"}, rd.port,
                  redis_extra={"timeout_ms": 3000, "batch_linger_us": linger})
        assert hit(p.port, uniq()).status == 200              # connected
        t0 = time.monotonic()
        assert hit(p.port, uniq()).status == 200              # nothing in flight: no wait
        assert time.monotonic() - t0 < 0.08, linger
        before = rd.cmdstat("evalsha")
        rd.cli("CLIENT", "PAUSE", "300", "ALL")
        codes = read_codes(sent_apart(p.port, 5, uniq(), 0.01))
        assert codes == [200] * 5, (linger, codes)
        assert rd.cmdstat("evalsha") - before == calls_expected, linger
        assert "fallback" not in p.stdout() and "on_redis_error" not in p.stderr()
        p.stop()
