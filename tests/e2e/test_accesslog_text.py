"""Access log: the text format (a template) and sampling."""
import json
import time

import util
from conftest import make_config


def read_lines(path, n, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.05)
    return path.read_text().splitlines() if path.exists() else []


def test_text_default_template(portico, echo, tmp_path):
    log = tmp_path / "a.log"
    p = portico(make_config(upstreams={"e": {"endpoints": [echo.addr]}},
                            routes=[{"name": "api", "path": "/", "upstream": "e"}],
                            access_log={"path": str(log), "format": "text"}))
    util.get(p.port, "/hello?token=secret")
    line = read_lines(log, 1)[0]
    assert '"GET test.local/hello" 200' in line
    assert "route=api" in line and "upstream=" + echo.addr in line
    assert "secret" not in line  # the query is never logged
    assert "request_id=-" in line


def test_text_template_escapes_and_filter_fields(portico, echo, tmp_path):
    log = tmp_path / "a.log"
    p = portico(make_config(upstreams={"e": {"endpoints": [echo.addr]}},
                            routes=[{"path": "/", "upstream": "e",
                                     "filters": [{"request_id": {}}]}],
                            access_log={"path": str(log), "format": "text",
                                        "template": "%{method} %{path} %{status} id=%{request_id} x=%{nope}"}))
    util.get(p.port, "/a%22b%0Ac", headers={"X-Request-Id": "abc-123"})
    line = read_lines(log, 1)[0]
    assert line == "GET /a%22b%0Ac 200 id=abc-123 x=-", line


def test_sampling_keeps_errors(portico, echo, tmp_path):
    log = tmp_path / "a.log"
    p = portico(make_config(upstreams={"e": {"endpoints": [echo.addr]}},
                            routes=[{"path": "/sampled/", "upstream": "e", "log_sample": 0.1},
                                    {"path": "/status/", "upstream": "e", "log_sample": 0.1},
                                    {"path": "/", "upstream": "e"}],
                            access_log={"path": str(log)}))
    with util.Conn(p.port) as c:
        for _ in range(300):
            c.request("GET", "/sampled/x")
            assert c.read_response().status == 200
        for _ in range(10):
            c.request("GET", "/status/503")
            assert c.read_response().status == 503
        for _ in range(20):
            c.request("GET", "/all")
            assert c.read_response().status == 200
    time.sleep(0.4)
    docs = [json.loads(l) for l in read_lines(log, 30)]
    sampled = [d for d in docs if d["path"] == "/sampled/x"]
    assert 5 <= len(sampled) <= 70, len(sampled)  # about 30
    assert len([d for d in docs if d["status"] == 503]) == 10
    assert len([d for d in docs if d["path"] == "/all"]) == 20


def test_bad_access_log_settings_refused(portico_bin, tmp_path):
    import subprocess
    for extra, msg in [({"format": "xml"}, "access_log.format"),
                       ({"template": "%{x}"}, 'only with "format": "text"'),
                       ({"format": "text", "template": "%{open"}, "access_log.template"),
                       ({"sample": 0}, "access_log.sample"),
                       ({"sample": 1.5}, "access_log.sample")]:
        cfg = make_config(routes=[{"path": "/", "respond": {"status": 200}}],
                          access_log=dict({"path": "-"}, **extra))
        f = tmp_path / "c.json"
        f.write_text(json.dumps(cfg))
        r = subprocess.run([portico_bin, "-t", "-c", str(f)], capture_output=True, text=True)
        assert r.returncode == 1 and msg in r.stderr, (extra, r.stderr)


def test_access_log_to_stderr(portico, echo):
    p = portico(make_config(upstreams={"e": {"endpoints": [echo.addr]}},
                            routes=[{"path": "/", "upstream": "e"}],
                            access_log={"path": "stderr", "format": "text",
                                        "template": "ACCESS %{method} %{path} %{status}"}))
    util.get(p.port, "/to-stderr")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and "ACCESS GET /to-stderr 200" not in p.stderr():
        time.sleep(0.05)
    assert "ACCESS GET /to-stderr 200" in p.stderr()
    assert "ACCESS" not in p.stdout()
