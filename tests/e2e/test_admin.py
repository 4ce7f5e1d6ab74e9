"""The admin listener: /healthz, /readyz, /metrics (parsed by the real
Prometheus text parser), /config with secrets redacted, /upstreams,
POST /reload, the bearer token, readiness during a drain, SIGUSR1."""
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

import util
from conftest import free_port, make_config

prom = pytest.importorskip("prometheus_client.parser",
                           reason="python3-prometheus-client is not installed")


def admin_get(port, path, token=None, method="GET", timeout=5):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def families(text):
    return {f.name: f for f in prom.text_string_to_metric_families(text)}


def sample_value(fams, family, sample_name, **labels):
    total = 0.0
    for s in fams[family].samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


def scrape_until(port, ready, timeout=3.0):
    """/metrics, parsed, once ready(fams) holds (or the last scrape after
    timeout, for the asserts to report). A request is counted when it ends,
    just after its answer's last byte is written: a scrape sent the moment
    the answer arrives can come before that."""
    deadline = time.monotonic() + timeout
    while True:
        fams = families(admin_get(port, "/metrics")[1])
        if ready(fams) or time.monotonic() >= deadline:
            return fams
        time.sleep(0.02)


def requests_counted(fams):
    return sample_value(fams, "portico_requests", "portico_requests_total")


@pytest.fixture
def admin_gw(portico, upstream):
    def start(admin=None, workers=2, **top):
        e = upstream("echo.py")
        aport = free_port()
        cfg = make_config(upstreams={"echo": {"endpoints": [e.addr]},
                                     "dead": {"endpoints": ["127.0.0.1:%d" % free_port()],
                                              "connect_timeout_ms": 300}},
                          routes=[{"name": "api", "path": "/api/", "upstream": "echo"},
                                  {"name": "slow", "path": "/slow/", "upstream": "echo"},
                                  {"name": "dead", "path": "/dead/", "upstream": "dead"},
                                  {"name": "home", "path": "/",
                                   "respond": {"status": 200, "body": "home\n"}}],
                          admin=dict({"address": "127.0.0.1:%d" % aport}, **(admin or {})),
                          workers=workers, **top)
        p = portico(cfg, env=top.pop("env", None) if "env" in top else None)
        p.admin_port = aport
        p.cfg = cfg
        p.echo = e
        return p
    return start


def test_healthz_and_readyz(admin_gw):
    p = admin_gw()
    assert admin_get(p.admin_port, "/healthz")[:2] == (200, "ok\n")
    assert admin_get(p.admin_port, "/readyz")[:2] == (200, "ready\n")
    assert admin_get(p.admin_port, "/nope")[0] == 404
    assert admin_get(p.admin_port, "/healthz", method="POST")[0] == 405


def test_metrics_parse_and_count(admin_gw):
    p = admin_gw()
    for _ in range(7):
        assert util.get(p.port, "/api/x").status == 200
    for _ in range(3):
        assert util.get(p.port, "/nothing-here").status == 200  # the "home" respond route
    assert util.get(p.port, "/dead/x").status == 502
    st, text, hdr = admin_get(p.admin_port, "/metrics")
    assert st == 200 and hdr["Content-Type"].startswith("text/plain; version=0.0.4")
    families(text)  # raises on a malformed exposition
    fams = scrape_until(p.admin_port, lambda f: requests_counted(f) >= 11)
    assert sample_value(fams, "portico_requests", "portico_requests_total",
                        route="api", method="GET", code="2xx") == 7
    assert sample_value(fams, "portico_requests", "portico_requests_total",
                        route="home", code="2xx") == 3
    assert sample_value(fams, "portico_requests", "portico_requests_total",
                        route="dead", code="5xx") == 1
    assert sample_value(fams, "portico_request_duration_seconds",
                        "portico_request_duration_seconds_count", route="api") == 7
    # cumulative buckets end at the count
    inf = [s for s in fams["portico_request_duration_seconds"].samples
           if s.name.endswith("_bucket") and s.labels["route"] == "api" and s.labels["le"] == "+Inf"]
    assert inf and inf[0].value == 7
    assert sample_value(fams, "portico_upstream_requests", "portico_upstream_requests_total",
                        upstream="echo", code="2xx") == 7
    assert sample_value(fams, "portico_upstream_errors", "portico_upstream_errors_total",
                        upstream="dead", kind="connect") == 1
    assert sample_value(fams, "portico_connections_accepted",
                        "portico_connections_accepted_total") >= 11
    assert fams["portico_build_info"].samples[0].labels["version"]
    assert fams["portico_workers"].samples[0].value == 2
    assert fams["portico_connections_active"].type == "gauge"


def test_metrics_summed_over_workers(admin_gw):
    p = admin_gw(workers=2)
    for _ in range(40):  # fresh connections spread over both workers
        assert util.get(p.port, "/api/x").status == 200
    fams = scrape_until(p.admin_port, lambda f: requests_counted(f) >= 40)
    assert sample_value(fams, "portico_requests", "portico_requests_total", route="api") == 40


def test_config_is_redacted(admin_gw, monkeypatch, tmp_path):
    secret_file = tmp_path / "tok"
    secret_file.write_text("file-secret-123")
    monkeypatch.setenv("PORTICO_TEST_ADMIN_TOKEN", "env-secret-456")
    p = admin_gw(admin={"token": "${PORTICO_TEST_ADMIN_TOKEN}"})
    st, body, _ = admin_get(p.admin_port, "/config", token="env-secret-456")
    assert st == 200
    assert "env-secret-456" not in body
    doc = json.loads(body)
    assert doc["admin"]["token"] == "${PORTICO_TEST_ADMIN_TOKEN}"
    assert doc["routes"][0]["name"] == "api"


def test_token_required(admin_gw):
    p = admin_gw(admin={"token": "t0ken"})
    for path in ("/metrics", "/config", "/upstreams"):
        st, _, hdr = admin_get(p.admin_port, path)
        assert st == 401 and "Bearer" in hdr.get("WWW-Authenticate", "")
        assert admin_get(p.admin_port, path, token="wrong")[0] == 401
        assert admin_get(p.admin_port, path, token="t0ke")[0] == 401
        assert admin_get(p.admin_port, path, token="t0ken")[0] == 200
    assert admin_get(p.admin_port, "/reload", method="POST")[0] == 401
    # probes need no token
    assert admin_get(p.admin_port, "/healthz")[0] == 200
    assert admin_get(p.admin_port, "/readyz")[0] == 200
    assert "t0ken" not in p.stderr()


def test_upstreams(admin_gw):
    p = admin_gw()
    util.get(p.port, "/api/x")
    util.get(p.port, "/dead/x")
    st, body, _ = admin_get(p.admin_port, "/upstreams")
    doc = {u["name"]: u for u in json.loads(body)["upstreams"]}
    assert doc["echo"]["endpoints"][0]["address"] == p.echo.addr
    assert doc["echo"]["endpoints"][0]["requests"] == 1
    assert doc["dead"]["endpoints"][0]["errors"] == 1


def test_reload_endpoint(admin_gw):
    p = admin_gw()
    assert util.get(p.port, "/new/x").body == b"home\n"
    cfg = dict(p.cfg)
    cfg["routes"] = [{"name": "new", "path": "/new/", "upstream": "echo"}] + p.cfg["routes"]
    p.config_path.write_text(json.dumps(cfg))
    st, body, _ = admin_get(p.admin_port, "/reload", method="POST")
    assert st == 200 and json.loads(body)["status"] == "reloaded"
    assert util.get(p.port, "/new/x").json()["target"] == "/new/x"
    assert admin_get(p.admin_port, "/reload")[0] == 405
    p.config_path.write_text('{"listeners": [}')
    st, body, _ = admin_get(p.admin_port, "/reload", method="POST")
    doc = json.loads(body)
    assert st == 400 and doc["status"] == "failed" and "line 1" in doc["error"]
    assert util.get(p.port, "/new/x").status == 200
    fams = families(admin_get(p.admin_port, "/metrics")[1])
    assert sample_value(fams, "portico_config_reloads", "portico_config_reloads_total",
                        result="ok") == 1
    assert sample_value(fams, "portico_config_reloads", "portico_config_reloads_total",
                        result="failed") == 1


def test_readyz_turns_unready_on_sigterm(admin_gw):
    p = admin_gw(limits={"drain_timeout_ms": 3000})
    result = {}

    def slow():
        result["r"] = util.get(p.port, "/slow/1200", timeout=5)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    p.signal(signal.SIGTERM)
    p.expect_exit = True
    time.sleep(0.2)
    st, body, _ = admin_get(p.admin_port, "/readyz")
    assert (st, body) == (503, "draining\n")
    assert admin_get(p.admin_port, "/healthz")[0] == 200
    t.join(5)
    assert result["r"].status == 200
    assert p.wait(5) == 0


def test_admin_port_busy_is_an_error(portico, echo, tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    try:
        cfg = make_config(upstreams={"e": {"endpoints": [echo.addr]}},
                          routes=[{"path": "/", "upstream": "e"}],
                          admin={"address": "127.0.0.1:%d" % blocker.getsockname()[1]})
        p = portico(cfg, wait=False)
        p.expect_exit = True
        assert p.wait(5) == 1
        assert "admin" in p.stderr()
    finally:
        blocker.close()


def test_sigusr1_reopens_access_log(portico, echo, tmp_path):
    log = tmp_path / "access.log"
    cfg = make_config(upstreams={"e": {"endpoints": [echo.addr]}},
                      routes=[{"path": "/", "upstream": "e"}],
                      access_log={"path": str(log)})
    p = portico(cfg)
    util.get(p.port, "/before")
    time.sleep(0.3)
    os.rename(log, tmp_path / "access.log.1")  # what logrotate does
    p.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not log.exists():
        time.sleep(0.02)
    util.get(p.port, "/after")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and "/after" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.05)
    assert "/before" in (tmp_path / "access.log.1").read_text()
    assert "/after" in log.read_text() and "/before" not in log.read_text()


def test_no_error_log_line_per_request_at_default_level(admin_gw):
    """An upstream outage must not write one error-log line per request."""
    p = admin_gw()
    for _ in range(30):
        assert util.get(p.port, "/dead/x").status == 502
    lines = [ln for ln in p.stderr().splitlines() if "dead" in ln and "[warn]" in ln]
    assert 1 <= len(lines) <= 3, lines


def test_module_metrics(portico, echo, portico_bin):
    import base64
    import hashlib
    import hmac
    import subprocess
    mods = subprocess.run([portico_bin, "-V"], capture_output=True, text=True).stdout
    if "jwt_auth" not in mods or "rate_limit" not in mods:
        pytest.skip("jwt_auth and rate_limit are not both built in")
    secret = "0123456789abcdef0123456789abcdef"

    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    def token(claims):
        h = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        p = b64(json.dumps(claims).encode())
        sig = hmac.new(secret.encode(), (h + "." + p).encode(), hashlib.sha256).digest()
        return h + "." + p + "." + b64(sig)

    aport = free_port()
    cfg = make_config(upstreams={"e": {"endpoints": [echo.addr]}},
                      jwt_providers={"t": {"issuer": "test", "algorithms": ["HS256"],
                                           "secret": secret}},
                      routes=[{"name": "api", "path": "/", "upstream": "e",
                               "filters": [{"jwt_auth": {"provider": "t"}},
                                           {"rate_limit": {"key": "jwt:sub", "rate": "3/m"}}]}],
                      admin={"address": "127.0.0.1:%d" % aport})
    p = portico(cfg)
    good = token({"iss": "test", "sub": "alice", "exp": int(time.time()) + 600})
    expired = token({"iss": "test", "sub": "alice", "exp": int(time.time()) - 600})
    codes = [util.get(p.port, "/x", headers={"Authorization": "Bearer " + good}).status
             for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    assert util.get(p.port, "/x").status == 401
    assert util.get(p.port, "/x", headers={"Authorization": "Bearer " + expired}).status == 401
    fams = scrape_until(aport, lambda f: requests_counted(f) >= 7)
    assert sample_value(fams, "portico_jwt_requests", "portico_jwt_requests_total",
                        outcome="accepted") == 5
    assert sample_value(fams, "portico_jwt_requests", "portico_jwt_requests_total",
                        outcome="refused") == 2
    assert sample_value(fams, "portico_rate_limit_decisions", "portico_rate_limit_decisions_total",
                        route="api", outcome="allowed") == 3
    limited = sum(s.value for s in fams["portico_rate_limit_decisions"].samples
                  if s.name.endswith("_total") and s.labels.get("outcome", "").startswith("limited"))
    assert limited == 2
    text = admin_get(aport, "/metrics")[1]
    assert good not in text and secret not in text


def test_readyz_requires_modules(portico, echo, portico_bin, tmp_path):
    import subprocess
    if "rate_limit" not in subprocess.run([portico_bin, "-V"], capture_output=True,
                                          text=True).stdout:
        pytest.skip("rate_limit is not built in")
    dead = free_port()  # no Redis listens here
    for requires, want in (([], 200), (["modules"], 503)):
        aport = free_port()
        cfg = make_config(upstreams={"e": {"endpoints": [echo.addr]}},
                          redis={"address": "127.0.0.1:%d" % dead, "timeout_ms": 200},
                          routes=[{"path": "/", "upstream": "e",
                                   "filters": [{"rate_limit": {"key": "ip", "rate": "100/s"}}]}],
                          admin={"address": "127.0.0.1:%d" % aport, "ready_requires": requires})
        p = portico(cfg)
        assert util.get(p.port, "/x").status == 200  # on_redis_error: local
        st, body, _ = wait_ready(aport, want)
        assert st == want, body
        if want == 503:
            assert "redis" in body and "unreachable" in body
        p.stop()
    bad = make_config(routes=[{"path": "/", "respond": {"status": 200}}],
                      admin={"ready_requires": ["redis"]})
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))
    r = subprocess.run([portico_bin, "-t", "-c", str(f)], capture_output=True, text=True)
    assert r.returncode == 1 and "admin.ready_requires[0]" in r.stderr


def wait_ready(aport, want, timeout=3.0):
    deadline = time.monotonic() + timeout
    while True:
        res = admin_get(aport, "/readyz")
        if res[0] == want or time.monotonic() > deadline:
            return res
        time.sleep(0.05)


def test_endpoint_health_gauges_and_readiness(portico, upstream):
    good = upstream("echo.py")
    dead = free_port()
    aport = free_port()
    hc = {"path": "/healthz", "interval_ms": 100, "timeout_ms": 200,
          "unhealthy_threshold": 1, "healthy_threshold": 1}
    cfg = make_config(upstreams={"ok": {"endpoints": [good.addr], "health_check": hc},
                                 "down": {"endpoints": ["127.0.0.1:%d" % dead], "health_check": hc}},
                      routes=[{"path": "/", "upstream": "ok"}],
                      admin={"address": "127.0.0.1:%d" % aport,
                             "ready_requires": ["healthy_endpoints"]})
    portico(cfg)
    st, body, _ = wait_ready(aport, 503)
    assert st == 503 and "upstream down: no healthy endpoint" in body, body
    fams = families(admin_get(aport, "/metrics")[1])
    h = {(s.labels["upstream"]): s.value for s in fams["portico_upstream_endpoint_healthy"].samples}
    assert h == {"ok": 1.0, "down": 0.0}, h
    circ = [s.labels["state"] for s in fams["portico_upstream_endpoint_circuit"].samples]
    assert set(circ) <= {"closed", "open", "half_open"} and len(circ) == 2
    assert fams["portico_upstream_endpoint_active_requests"].type == "gauge"
    # the dead endpoint comes up: ready
    import subprocess
    import sys
    srv = subprocess.Popen(["/usr/bin/python3", str(__import__("pathlib").Path(__file__).parent /
                                                    "servers" / "echo.py"), "--port", str(dead)])
    try:
        st, body, _ = wait_ready(aport, 200, timeout=5)
        assert st == 200, body
    finally:
        srv.kill()
        srv.wait()
