"""Upstream resilience with real echo upstreams that the tests kill, slow
down and make fail (/__fail/N): retries on another endpoint, the circuit
breaker (the ejected endpoint receives nothing while open), the retry
budget, Retry-After, max_requests, health checks, the balancers and the
shared state surviving a reload. Upstream request counts come from each
echo's own /__stats."""
import hashlib
import json
import signal
import socket
import subprocess
import threading
import time

import util
from conftest import PYTHON, SERVERS, free_port, make_config


def names(port, n, target="/x", headers=None):
    out = []
    for i in range(n):
        r = util.get(port, "%s%d" % (target, i), headers=headers)
        out.append((r.status, r.json().get("server") if r.status == 200 else None))
    return out


def requests_of(u):
    return u.stats()["requests"]


def fail(u, status, retry_after=None):
    q = "?retry_after=%d" % retry_after if retry_after else ""
    assert util.get(u.port, "/__fail/%d%s" % (status, q)).status == 200


def admin_upstreams(port):
    return {u["name"]: {e["address"]: e for e in u["endpoints"]}
            for u in util.get(port, "/upstreams").json()["upstreams"]}


def reload_and_wait(p, before, timeout=5.0):
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.stderr().count("reloaded") > before:
            return
        time.sleep(0.02)
    raise AssertionError("no reload in the log:\n%s" % p.stderr()[-3000:])


def three(upstream):
    return [upstream("echo.py", "--name", n) for n in ("a", "b", "c")]


def test_one_dead_endpoint_of_three_no_client_error(portico, upstream):
    ups = three(upstream)
    cfg = make_config(upstreams={"svc": {
        "endpoints": [u.addr for u in ups], "connect_timeout_ms": 500,
        "retry": {"attempts": 2, "on": ["connect_failure", "reset", "503"]},
        "circuit_breaker": {"consecutive_failures": 3, "open_ms": 5000}}},
        routes=[{"path": "/", "upstream": "svc"}])
    p = portico(cfg)
    assert {s for s, _ in names(p.port, 6)} == {200}
    ups[1].kill()
    ups[1].finish()
    got = names(p.port, 90)
    assert [s for s, _ in got] == [200] * 90
    assert {n for _, n in got} == {"a", "c"}


def test_post_is_not_retried_unless_allowed(portico, upstream):
    alive = upstream("echo.py", "--name", "alive")
    dead = "127.0.0.1:%d" % free_port()
    base = {"endpoints": [dead, alive.addr],
            "retry": {"attempts": 2, "on": ["connect_failure"]}}
    cfg = make_config(upstreams={"u": base, "u2": dict(base, retry=dict(base["retry"], retry_non_idempotent=True))},
                      routes=[{"path": "/strict/", "upstream": "u"},
                              {"path": "/lenient/", "upstream": "u2"}])
    p = portico(cfg)
    strict = [util.request(p.port, "POST", "/strict/%d" % i, body=b"hello").status for i in range(6)]
    assert 502 in strict and 200 in strict, strict
    lenient = [util.request(p.port, "POST", "/lenient/%d" % i, body=b"hello") for i in range(6)]
    assert [r.status for r in lenient] == [200] * 6
    # The replayed body arrived whole.
    assert {r.json()["body"] for r in lenient} == {"hello"}
    # A route may allow it for its requests alone.
    cfg["routes"].insert(0, {"path": "/strict/ok/", "upstream": "u", "retry_non_idempotent": True})
    p.config_path.write_text(json.dumps(cfg))
    reload_and_wait(p, 0)
    assert [util.request(p.port, "POST", "/strict/ok/%d" % i, body=b"hi").status
            for i in range(6)] == [200] * 6
    # GETs on the strict upstream are retried.
    assert [util.get(p.port, "/strict/g%d" % i).status for i in range(6)] == [200] * 6


def _post_in_two_parts(port, target, body, expect=False, pause=0.15):
    """A POST whose body does not come with its head: the head and a first
    piece, a pause, then the rest (as clients that write head and body
    separately, or a slow network, send it)."""
    with util.Conn(port, timeout=5.0) as c:
        head = ("POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n"
                % (target, len(body), "Expect: 100-continue\r\n" if expect else "")).encode()
        interim = []
        if expect:
            c.send(head)
            r = c.read_response(skip_interim=False)
            interim.append(r.status)
            c.send(body[:1000])
        else:
            c.send(head + body[:1000])
        time.sleep(pause)
        c.send(body[1000:])
        r = c.read_response()
        while 100 <= r.status < 200:
            interim.append(r.status)
            r = c.read_response()
        return r, interim


def test_small_body_sent_after_the_head_is_kept_and_replayed(portico, upstream):
    """A body up to max_replay_body_bytes is replayable even when it
    arrives after the head (read into a copy before the first try), and
    larger than the client read buffer (16 KiB)."""
    alive = upstream("echo.py", "--name", "alive")
    dead = "127.0.0.1:%d" % free_port()
    cfg = make_config(upstreams={"u": {
        "endpoints": [dead, alive.addr],
        "retry": {"attempts": 2, "on": ["connect_failure"], "retry_non_idempotent": True,
                  "max_replay_body_bytes": 60000}}},
        routes=[{"path": "/", "upstream": "u"}])
    p = portico(cfg)
    body = bytes((i * 7) % 251 for i in range(50000))
    for i in range(6):
        r, interim = _post_in_two_parts(p.port, "/sink", body)
        assert r.status == 200, (i, r)
        assert r.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                            "framing": "length"}, r.json()
        assert interim == []
    # With Expect: 100-continue: one 100 Continue, then the answer.
    for i in range(4):
        r, interim = _post_in_two_parts(p.port, "/sink", body, expect=True)
        assert interim == [100], (i, interim)
        assert r.status == 200 and r.json()["length"] == len(body), r
    # Requests went to the dead endpoint and were retried: none failed.
    assert requests_of(alive) >= 10
    # Over the limit, the body streams and the request is not retried.
    big = bytes(70000)
    statuses = [_post_in_two_parts(p.port, "/sink", big)[0].status for _ in range(6)]
    assert 502 in statuses and 200 in statuses, statuses


def test_body_wait_timeout_and_client_leaving(portico, upstream):
    """While a kept body is read, the body deadline holds (408) and a client
    that leaves costs nothing upstream."""
    alive = upstream("echo.py", "--name", "alive")
    cfg = make_config(upstreams={"u": {
        "endpoints": [alive.addr],
        "retry": {"attempts": 2, "on": ["connect_failure"], "retry_non_idempotent": True}}},
        routes=[{"path": "/", "upstream": "u"}])
    cfg.setdefault("limits", {})["body_timeout_ms"] = 400
    p = portico(cfg)
    before = requests_of(alive)
    with util.Conn(p.port, timeout=5.0) as c:
        c.send(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n" + b"a" * 100)
        r = c.read_response()
        assert r.status == 408, r
    with util.Conn(p.port, timeout=5.0) as c:
        c.send(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n" + b"a" * 100)
    time.sleep(0.3)
    assert requests_of(alive) == before
    # and the gateway still answers
    r, _ = _post_in_two_parts(p.port, "/sink", b"z" * 3000)
    assert r.status == 200 and r.json()["length"] == 3000


def test_breaker_opens_after_n_failures_and_closes_after_recovery(portico, upstream):
    a, b = upstream("echo.py", "--name", "a"), upstream("echo.py", "--name", "b")
    admin = free_port()
    cfg = make_config(upstreams={"svc": {
        "endpoints": [a.addr, b.addr],
        "retry": {"attempts": 2, "on": ["503"], "backoff_ms": 0},
        "circuit_breaker": {"consecutive_failures": 3, "open_ms": 1500}}},
        routes=[{"path": "/", "upstream": "svc"}], admin={"address": "127.0.0.1:%d" % admin})
    p = portico(cfg)
    fail(a, 503)
    before = requests_of(a)
    got = names(p.port, 30)
    assert [s for s, _ in got] == [200] * 30       # every 503 was retried on b
    assert requests_of(a) - before == 3            # then a got nothing: open
    st = admin_upstreams(admin)["svc"]
    assert st[a.addr]["circuit"] == "open" and st[b.addr]["circuit"] == "closed"
    fail(a, 0)
    time.sleep(1.7)
    got = names(p.port, 20)
    assert [s for s, _ in got] == [200] * 20
    assert {n for _, n in got} == {"a", "b"}       # a is back (half-open trial passed)
    assert admin_upstreams(admin)["svc"][a.addr]["circuit"] == "closed"
    metrics = util.get(admin, "/metrics").body.decode()
    assert "portico_upstream_ejections_total" in metrics
    assert "portico_upstream_retries_total" in metrics


def test_every_endpoint_ejected_answers_503_at_once(portico):
    d1, d2 = "127.0.0.1:%d" % free_port(), "127.0.0.1:%d" % free_port()
    cfg = make_config(upstreams={"gone": {
        "endpoints": [d1, d2], "circuit_breaker": {"consecutive_failures": 2, "open_ms": 5000}}},
        routes=[{"path": "/", "upstream": "gone"}])
    p = portico(cfg)
    first = [util.get(p.port, "/x").status for _ in range(4)]
    assert set(first) == {502}
    t0 = time.monotonic()
    rs = [util.get(p.port, "/x") for _ in range(20)]
    assert time.monotonic() - t0 < 1.0
    assert {r.status for r in rs} == {503}
    assert rs[0].header("retry-after") == "1"


def test_retry_budget_caps_retries_in_a_total_outage(portico, upstream):
    a, b = upstream("echo.py", "--name", "a"), upstream("echo.py", "--name", "b")
    admin = free_port()
    cfg = make_config(upstreams={"svc": {
        "endpoints": [a.addr, b.addr],
        "retry": {"attempts": 3, "on": ["503"], "backoff_ms": 0, "budget_percent": 20,
                  "min_retries_per_second": 0}}},
        routes=[{"path": "/", "upstream": "svc"}], admin={"address": "127.0.0.1:%d" % admin})
    p = portico(cfg)
    fail(a, 503)
    fail(b, 503)
    n = 50
    before = requests_of(a) + requests_of(b)
    statuses = [util.get(p.port, "/x%d" % i).status for i in range(n)]
    assert set(statuses) == {503}
    sent = requests_of(a) + requests_of(b) - before
    # Without a budget this would be 3 * n.
    assert n <= sent <= n + n * 20 // 100 + 1, sent
    assert 'portico_upstream_retry_budget_exhausted_total{upstream="svc"}' in \
        util.get(admin, "/metrics").body.decode()


def test_retry_after_is_not_retried_sooner(portico, upstream):
    a, b = upstream("echo.py", "--name", "a"), upstream("echo.py", "--name", "b")
    cfg = make_config(upstreams={"svc": {
        "endpoints": [a.addr, b.addr],
        "retry": {"attempts": 2, "on": ["503"], "backoff_ms": 0}}},
        routes=[{"path": "/", "upstream": "svc"}])
    p = portico(cfg)
    fail(a, 503, retry_after=5)
    rs = [util.get(p.port, "/x%d" % i) for i in range(6)]
    relayed = [r for r in rs if r.status == 503]
    assert len(relayed) == 3 and all(r.header("retry-after") == "5" for r in relayed)
    fail(a, 503)  # no Retry-After: retried on b
    assert [util.get(p.port, "/y%d" % i).status for i in range(6)] == [200] * 6


def test_max_requests_answers_503_without_contacting(portico, upstream):
    a = upstream("echo.py", "--name", "a")
    cfg = make_config(upstreams={"svc": {"endpoints": [a.addr], "max_requests": 1}},
                      routes=[{"path": "/", "upstream": "svc"}])
    p = portico(cfg)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", util.get(p.port, "/slow/800")))
    t.start()
    time.sleep(0.3)
    before = requests_of(a)
    r = util.get(p.port, "/x")
    assert r.status == 503 and r.header("retry-after") == "1"
    assert requests_of(a) == before
    t.join()
    assert out["r"].status == 200
    assert util.get(p.port, "/x").status == 200


def test_consistent_hash_keeps_keys_on_their_endpoint(portico, upstream):
    ups = three(upstream)
    d = upstream("echo.py", "--name", "d")
    up = {"endpoints": [u.addr for u in ups], "balance": "hash", "hash_on": "header:X-User"}
    cfg = make_config(upstreams={"svc": up}, routes=[{"path": "/", "upstream": "svc"}])
    p = portico(cfg)

    def owners():
        out = {}
        for k in range(60):
            r = util.get(p.port, "/k", headers={"X-User": "user-%d" % k})
            out[k] = r.json()["server"]
        return out

    first = owners()
    assert owners() == first
    assert len(set(first.values())) == 3
    cfg["upstreams"]["svc"]["endpoints"].append(d.addr)
    p.config_path.write_text(json.dumps(cfg))
    reload_and_wait(p, 0)
    after = owners()
    moved = [k for k in first if after[k] != first[k]]
    assert moved, "the new endpoint got no keys"
    assert all(after[k] == "d" for k in moved)
    assert len(moved) < 30


def test_least_request_prefers_the_idle_endpoint(portico, upstream):
    a, b = upstream("echo.py", "--name", "a"), upstream("echo.py", "--name", "b")
    cfg = make_config(upstreams={"svc": {"endpoints": [a.addr, b.addr], "balance": "least_request"}},
                      routes=[{"path": "/", "upstream": "svc"}])
    p = portico(cfg)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", util.get(p.port, "/slow/1000")))
    t.start()
    time.sleep(0.3)
    got = [n for _, n in names(p.port, 10)]
    t.join()
    busy = out["r"].json()["server"]
    assert busy not in got and len(set(got)) == 1


def test_weights(portico, upstream):
    a, b = upstream("echo.py", "--name", "a"), upstream("echo.py", "--name", "b")
    cfg = make_config(upstreams={"svc": {"endpoints": [{"address": a.addr, "weight": 3}, b.addr]}},
                      routes=[{"path": "/", "upstream": "svc"}])
    p = portico(cfg)
    got = [n for _, n in names(p.port, 40)]
    assert got.count("a") == 30 and got.count("b") == 10
    # Smooth: never more than three a's in a row.
    assert "aaaa" not in "".join(got)


def test_random_spreads(portico, upstream):
    a, b = upstream("echo.py", "--name", "a"), upstream("echo.py", "--name", "b")
    cfg = make_config(upstreams={"svc": {"endpoints": [a.addr, b.addr], "balance": "random"}},
                      routes=[{"path": "/", "upstream": "svc"}])
    p = portico(cfg)
    got = [n for _, n in names(p.port, 60)]
    assert 10 <= got.count("a") <= 50


def test_health_checks_mark_down_and_up(portico, upstream):
    a, b = upstream("echo.py", "--name", "a"), upstream("echo.py", "--name", "b")
    admin = free_port()
    cfg = make_config(upstreams={"svc": {
        "endpoints": [a.addr, b.addr],
        "health_check": {"path": "/healthz", "interval_ms": 100, "timeout_ms": 500,
                         "healthy_threshold": 2, "unhealthy_threshold": 2}}},
        routes=[{"path": "/", "upstream": "svc"}], admin={"address": "127.0.0.1:%d" % admin})
    p = portico(cfg)
    fail(a, 500)
    assert util.wait_until(lambda: admin_upstreams(admin)["svc"][a.addr]["health"] == "unhealthy", 3)
    got = names(p.port, 10)
    assert got == [(200, "b")] * 10
    # A reload keeps the verdict: with checks now a minute apart (one
    # failing check right after the reload is below the threshold of 2),
    # only the shared state can keep a out.
    cfg["upstreams"]["svc"]["health_check"]["interval_ms"] = 60000
    p.config_path.write_text(json.dumps(cfg))
    reload_and_wait(p, 0)
    time.sleep(0.3)
    assert admin_upstreams(admin)["svc"][a.addr]["health"] == "unhealthy"
    assert names(p.port, 6) == [(200, "b")] * 6
    cfg["upstreams"]["svc"]["health_check"]["interval_ms"] = 100
    p.config_path.write_text(json.dumps(cfg))
    reload_and_wait(p, 1)
    fail(a, 0)
    assert util.wait_until(lambda: admin_upstreams(admin)["svc"][a.addr]["health"] == "healthy", 3)
    assert "a" in {n for _, n in names(p.port, 10)}
    # Checked from one place: with 2 workers, still about one check per interval.
    assert "unhealthy" in p.stderr()


def test_reload_keeps_breaker_and_health_state(portico, upstream):
    a, b = upstream("echo.py", "--name", "a"), upstream("echo.py", "--name", "b")
    admin = free_port()
    cfg = make_config(upstreams={"svc": {
        "endpoints": [a.addr, b.addr],
        "retry": {"attempts": 2, "on": ["503"], "backoff_ms": 0},
        "circuit_breaker": {"consecutive_failures": 2, "open_ms": 20000}}},
        routes=[{"path": "/", "upstream": "svc"}], admin={"address": "127.0.0.1:%d" % admin},
        workers=2)
    p = portico(cfg)
    fail(a, 503)
    names(p.port, 8)
    assert admin_upstreams(admin)["svc"][a.addr]["circuit"] == "open"
    fail(a, 0)
    before = requests_of(a)
    cfg["routes"].append({"path": "/other/", "respond": {"status": 204}})
    p.config_path.write_text(json.dumps(cfg))
    reload_and_wait(p, 0)
    assert admin_upstreams(admin)["svc"][a.addr]["circuit"] == "open"
    assert {n for _, n in names(p.port, 10)} == {"b"}
    assert requests_of(a) == before
    assert util.get(p.port, "/other/").status == 204


def test_dns_name_is_followed_when_its_record_changes(portico, upstream, tmp_path):
    """A host name endpoint resolved by the DNS thread from an /etc/hosts
    style file (dns.hosts_file, read again at each refresh): when the
    record moves to another address, traffic follows without a reload;
    when the name stops resolving, the last addresses stay."""
    a = upstream("echo.py", "--name", "a")
    # b: the same port as a on 127.0.0.2 (a name maps to addresses; the
    # port is the endpoint's).
    bp = subprocess.Popen([PYTHON, "-S", str(SERVERS / "echo.py"), "--port", str(a.port),
                           "--host", "127.0.0.2", "--name", "b"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert util.wait_until(lambda: _can_connect("127.0.0.2", a.port), 5)
        hosts = tmp_path / "hosts"
        hosts.write_text("127.0.0.1 svc.test\n")
        admin = free_port()
        cfg = make_config(upstreams={"svc": {
            "endpoints": ["svc.test:%d" % a.port],
            "dns": {"hosts_file": str(hosts), "refresh_ms": 100, "max_addresses": 4}}},
            routes=[{"path": "/", "upstream": "svc"}], admin={"address": "127.0.0.1:%d" % admin})
        p = portico(cfg)
        assert util.wait_until(lambda: util.get(p.port, "/x").status == 200, 3)
        assert {n for _, n in names(p.port, 5)} == {"a"}
        hosts.write_text("127.0.0.2 svc.test\n")
        assert util.wait_until(lambda: util.get(p.port, "/x").json().get("server") == "b", 3)
        assert {n for _, n in names(p.port, 5)} == {"b"}
        # Both addresses: both get traffic.
        hosts.write_text("127.0.0.1 svc.test\n127.0.0.2 svc.test\n")
        assert util.wait_until(lambda: {n for _, n in names(p.port, 6)} == {"a", "b"}, 3)
        # The name no longer resolves: the last known addresses stay.
        hosts.write_text("# nothing\n")
        time.sleep(0.5)
        assert [s for s, _ in names(p.port, 6)] == [200] * 6
        assert "keeping the last known addresses" in p.stderr()
        eps = admin_upstreams(admin)["svc"]
        assert len(eps) == 4
        assert sorted(e["resolved"] for e in eps.values() if e["resolved"]) == \
            ["127.0.0.1:%d" % a.port, "127.0.0.2:%d" % a.port]
    finally:
        bp.kill()
        bp.wait()


def _can_connect(host, port):
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_reset_before_any_byte_and_per_try_timeout_are_retried(portico, upstream):
    """misbehave "close" (the request is read, the connection closed without
    a byte) and "hang" (never answers): retried on the good endpoint when
    "reset" / "timeout" are listed, the failure answered otherwise."""
    closer = upstream("misbehave.py", "--mode", "close")
    hanger = upstream("misbehave.py", "--mode", "hang")
    good = upstream("echo.py", "--name", "good")
    base = {"retry": {"attempts": 2, "on": ["reset", "timeout"], "backoff_ms": 0,
                      "per_try_timeout_ms": 300}}
    cfg = make_config(upstreams={
        "r": dict(base, endpoints=[closer.addr, good.addr]),
        "t": dict(base, endpoints=[hanger.addr, good.addr]),
        "n": {"endpoints": [closer.addr, good.addr], "retry": {"attempts": 2, "on": ["connect_failure"]}}},
        routes=[{"path": "/r/", "upstream": "r"}, {"path": "/t/", "upstream": "t"},
                {"path": "/n/", "upstream": "n"}])
    p = portico(cfg)
    assert [util.get(p.port, "/r/%d" % i).status for i in range(6)] == [200] * 6
    t0 = time.monotonic()
    assert [util.get(p.port, "/t/%d" % i).status for i in range(4)] == [200] * 4
    assert time.monotonic() - t0 < 4 * 0.3 + 1.5   # each waited at most one per-try timeout
    assert 502 in [util.get(p.port, "/n/%d" % i).status for i in range(4)]


def test_health_checks_come_from_one_place(portico, upstream):
    """Four workers, one check per interval: the checks do not multiply."""
    a = upstream("echo.py", "--name", "a")
    cfg = make_config(upstreams={"svc": {
        "endpoints": [a.addr], "health_check": {"path": "/healthz", "interval_ms": 200}}},
        routes=[{"path": "/", "upstream": "svc"}], workers=4)
    portico(cfg)
    time.sleep(0.5)
    before = requests_of(a)
    time.sleep(2.0)
    n = requests_of(a) - before
    assert 7 <= n <= 13, n   # about 10 in 2 s; 40 if each worker checked


def test_dns_name_served_by_a_name_server_is_followed(portico, upstream, tmp_path):
    """The same through a real (test) DNS server over UDP (dns.nameserver):
    the record changes, traffic follows; the server dies, the last
    addresses stay."""
    a = upstream("echo.py", "--name", "a")
    bp = subprocess.Popen([PYTHON, "-S", str(SERVERS / "echo.py"), "--port", str(a.port),
                           "--host", "127.0.0.2", "--name", "b"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = tmp_path / "records.json"
    records.write_text(json.dumps({"svc.test": ["127.0.0.1"]}))
    dport = free_port()
    dns = subprocess.Popen([PYTHON, "-S", str(SERVERS / "dns.py"), "--port", str(dport),
                            "--records", str(records), "--log", str(tmp_path / "dns.log")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert util.wait_until(lambda: _can_connect("127.0.0.2", a.port), 5)
        cfg = make_config(upstreams={"svc": {
            "endpoints": ["svc.test:%d" % a.port],
            "dns": {"nameserver": "127.0.0.1:%d" % dport, "refresh_ms": 150}}},
            routes=[{"path": "/", "upstream": "svc"}])
        p = portico(cfg)
        assert util.wait_until(lambda: util.get(p.port, "/x").status == 200, 5)
        assert {n for _, n in names(p.port, 4)} == {"a"}
        records.write_text(json.dumps({"svc.test": ["127.0.0.2"]}))
        assert util.wait_until(lambda: util.get(p.port, "/x").json().get("server") == "b", 5)
        assert {n for _, n in names(p.port, 4)} == {"b"}
        assert "svc.test 1" in (tmp_path / "dns.log").read_text().lower()  # evdns mixes case (0x20)
        dns.kill()
        dns.wait()
        time.sleep(0.6)
        assert [s for s, _ in names(p.port, 4)] == [200] * 4
    finally:
        for proc in (bp, dns):
            proc.kill()
            proc.wait()


def test_max_pending_answers_503_while_connections_hang(portico):
    """An endpoint whose accept queue is full: connects stay pending (the
    kernel drops the SYNs). With max_pending 1, a second request while the
    first waits is answered 503 at once."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    addr = ls.getsockname()
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(addr)
        fillers.append(s)
    time.sleep(0.2)
    try:
        cfg = make_config(upstreams={"svc": {"endpoints": ["127.0.0.1:%d" % addr[1]],
                                             "connect_timeout_ms": 1500, "max_pending": 1}},
                          routes=[{"path": "/", "upstream": "svc"}])
        p = portico(cfg)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", util.get(p.port, "/first")))
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        r = util.get(p.port, "/second")
        assert r.status == 503 and r.header("retry-after") == "1"
        assert time.monotonic() - t0 < 0.5
        t.join()
        assert out["r"].status == 502   # the first one's connect timed out
    finally:
        for s in fillers:
            s.close()
        ls.close()
