"""request_id module: the id (kept, replaced or generated) upstream, in the
response and in the access log; W3C traceparent continued or restarted."""
import json
import os
import re
import subprocess
import threading

import pytest

import util
from conftest import make_config

HEX32 = re.compile(r"^[0-9a-f]{32}$")
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture(autouse=True)
def need_module(portico_bin):
    out = subprocess.run([portico_bin, "-V"], capture_output=True, timeout=10).stdout.decode()
    mods = [ln for ln in out.splitlines() if ln.lower().startswith("modules:")]
    if not mods or "request_id" not in mods[0].split():
        pytest.skip("request_id module not built in")


def rid_gateway(gateway, tmp_path, conf=None, **top):
    """Echo behind one route "main" with the request_id filter; access log
    to a file (returned as the gateway's .log)."""
    log = tmp_path / "access.log"
    routes = [{"name": "main", "path": "/", "upstream": "echo",
               "filters": [{"request_id": conf or {}}]}]
    g = gateway(routes=routes, access_log={"path": str(log)}, **top)
    g.log = str(log)
    return g


def read_log(path, n, proc):
    """Wait for n access-log lines (up to 2 s); stop portico (which must
    flush) if they are not there yet."""
    def lines():
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [ln for ln in f.read().splitlines() if ln.strip()]
    if not util.wait_until(lambda: len(lines()) >= n, 2.0):
        proc.stop()
    return [json.loads(ln) for ln in lines()]


def upstream_ids(r, name="x-request-id"):
    return r.echoed_headers().get(name, [])


def test_generated_id_upstream_response_and_log(gateway, tmp_path):
    g = rid_gateway(gateway, tmp_path)
    r = g.get("/gen")
    assert r.status == 200
    rid = r.header("X-Request-Id")
    assert rid and HEX32.match(rid), r
    assert r.header_all("X-Request-Id") == [rid]
    assert upstream_ids(r) == [rid]
    tp = r.echoed_headers()["traceparent"]
    assert len(tp) == 1 and TRACEPARENT.match(tp[0]), tp
    entries = read_log(g.log, 1, g.portico)
    assert len(entries) == 1, entries
    assert entries[0]["request_id"] == rid
    assert entries[0]["trace_id"] == TRACEPARENT.match(tp[0]).group(1)


@pytest.mark.parametrize("incoming", ["abc", "0", "A-b_c.d:e", "x" * 128,
                                      "550e8400-e29b-41d4-a716-446655440000"])
def test_valid_incoming_id_kept(gateway, tmp_path, incoming):
    g = rid_gateway(gateway, tmp_path)
    r = g.get("/keep", headers=[("X-Request-Id", incoming)])
    assert r.header("X-Request-Id") == incoming
    assert upstream_ids(r) == [incoming]
    assert read_log(g.log, 1, g.portico)[0]["request_id"] == incoming


@pytest.mark.parametrize("incoming", ["x" * 129, "has space", "semi;colon", "a/b", "a,b",
                                      '"quoted"', "tab\there", "caf\xe9", "{json}"])
def test_invalid_incoming_id_replaced(gateway, tmp_path, incoming):
    g = rid_gateway(gateway, tmp_path)
    r = g.get("/bad", headers=[("X-Request-Id", incoming)])
    assert r.status == 200
    rid = r.header("X-Request-Id")
    assert rid and HEX32.match(rid), r
    assert upstream_ids(r) == [rid]
    assert incoming not in [v for _, v in r.json()["headers"]]


def test_duplicate_incoming_ids_collapse_to_one(gateway, tmp_path):
    g = rid_gateway(gateway, tmp_path)
    r = g.get("/dup", headers=[("X-Request-Id", "first"), ("X-Request-Id", "second")])
    assert upstream_ids(r) == [r.header("X-Request-Id")]


def test_trust_incoming_false_always_generates(gateway, tmp_path):
    g = rid_gateway(gateway, tmp_path, {"trust_incoming": False})
    r = g.get("/distrust", headers=[("X-Request-Id", "client-chosen")])
    rid = r.header("X-Request-Id")
    assert HEX32.match(rid), r
    assert upstream_ids(r) == [rid]


def test_custom_header_name(gateway, tmp_path):
    g = rid_gateway(gateway, tmp_path, {"header": "X-Correlation-Id"})
    r = g.get("/corr", headers=[("X-Correlation-Id", "corr-1"), ("X-Request-Id", "other")])
    assert r.header("X-Correlation-Id") == "corr-1"
    assert upstream_ids(r, "x-correlation-id") == ["corr-1"]
    assert upstream_ids(r) == ["other"]   # not ours: passes through
    assert read_log(g.log, 1, g.portico)[0]["request_id"] == "corr-1"


def test_traceparent_continued_with_new_span(gateway, tmp_path):
    g = rid_gateway(gateway, tmp_path)
    incoming = "00-%s-%s-01" % (TRACE, PARENT)
    r = g.get("/trace", headers=[("traceparent", incoming), ("tracestate", "congo=t61rcWkgMzE,rojo=1")])
    h = r.echoed_headers()
    assert len(h["traceparent"]) == 1
    m = TRACEPARENT.match(h["traceparent"][0])
    assert m, h["traceparent"]
    assert m.group(1) == TRACE
    assert m.group(2) != PARENT and m.group(2) != "0" * 16
    assert m.group(3) == "01"
    assert h["tracestate"] == ["congo=t61rcWkgMzE,rojo=1"]
    assert read_log(g.log, 1, g.portico)[0]["trace_id"] == TRACE


def test_traceparent_flags_kept(gateway, tmp_path):
    g = rid_gateway(gateway, tmp_path)
    r = g.get("/flags", headers=[("traceparent", "00-%s-%s-00" % (TRACE, PARENT))])
    m = TRACEPARENT.match(r.echoed_headers()["traceparent"][0])
    assert m.group(1) == TRACE and m.group(3) == "00"


def test_span_ids_differ_per_request(gateway, tmp_path):
    g = rid_gateway(gateway, tmp_path)
    spans = set()
    for _ in range(20):
        r = g.get("/s", headers=[("traceparent", "00-%s-%s-01" % (TRACE, PARENT))])
        m = TRACEPARENT.match(r.echoed_headers()["traceparent"][0])
        assert m.group(1) == TRACE
        spans.add(m.group(2))
    assert len(spans) == 20


@pytest.mark.parametrize("incoming", [
    "00-%s-%s-01" % (TRACE.upper(), PARENT),            # uppercase hex
    "00-%s-%s-01" % (TRACE, PARENT.upper()),
    "00-%s-%s-0A" % (TRACE, PARENT),
    "ff-%s-%s-01" % (TRACE, PARENT),                     # version ff is invalid
    "00-%s-%s-01" % ("0" * 32, PARENT),                  # all-zero trace-id
    "00-%s-%s-01" % (TRACE, "0" * 16),                   # all-zero parent-id
    "00-%s-%s-01-extra" % (TRACE, PARENT),               # version 00 has exactly 4 fields
    "00-%s-%s-1" % (TRACE, PARENT),                      # short flags
    "00-%s-%s-0g" % (TRACE, PARENT),
    "00-%s-%s-01" % (TRACE[:31], PARENT),                # short trace-id
    "00_%s_%s_01" % (TRACE, PARENT),                     # wrong separators
    "0-%s-%s-01" % (TRACE, PARENT),
    "cc-%s-%s-01x" % (TRACE, PARENT),                    # future version: field 4 must end
    "zz-%s-%s-01" % (TRACE, PARENT),
    "garbage",
])
def test_invalid_traceparent_restarts_trace(gateway, tmp_path, incoming):
    g = rid_gateway(gateway, tmp_path)
    r = g.get("/badtrace", headers=[("traceparent", incoming)])
    tps = r.echoed_headers()["traceparent"]
    assert len(tps) == 1, tps
    m = TRACEPARENT.match(tps[0])
    assert m, tps
    assert m.group(1).lower() != TRACE
    assert m.group(1) != "0" * 32 and m.group(2) != "0" * 16
    assert m.group(3) == "00"
    assert read_log(g.log, 1, g.portico)[0]["trace_id"] == m.group(1)


@pytest.mark.parametrize("incoming,flags", [
    ("cc-%s-%s-01" % (TRACE, PARENT), "01"),
    ("01-%s-%s-03-what-the-future-holds" % (TRACE, PARENT), "01"),
    ("cc-%s-%s-02-more" % (TRACE, PARENT), "00"),
])
def test_future_version_traceparent_accepted(gateway, tmp_path, incoming, flags):
    g = rid_gateway(gateway, tmp_path)
    r = g.get("/future", headers=[("traceparent", incoming)])
    m = TRACEPARENT.match(r.echoed_headers()["traceparent"][0])
    assert m, r.echoed_headers()["traceparent"]
    assert m.group(1) == TRACE and m.group(2) != PARENT
    assert m.group(3) == flags


def test_new_trace_sampled_when_configured(gateway, tmp_path):
    g = rid_gateway(gateway, tmp_path, {"sampled": True})
    m = TRACEPARENT.match(g.get("/sampled").echoed_headers()["traceparent"][0])
    assert m and m.group(3) == "01"


def test_traceparent_off(gateway, tmp_path):
    g = rid_gateway(gateway, tmp_path, {"traceparent": False})
    r = g.get("/off")
    assert "traceparent" not in r.echoed_headers()
    assert HEX32.match(r.header("X-Request-Id"))
    incoming = "00-%s-%s-01" % (TRACE.upper(), PARENT)
    r = g.get("/off", headers=[("traceparent", incoming)])
    assert r.echoed_headers()["traceparent"] == [incoming]   # untouched


def test_local_answer_carries_id(gateway, tmp_path):
    routes = [{"name": "local", "path": "/local", "exact": True,
               "respond": {"status": 200, "body": "hi"}, "filters": [{"request_id": {}}]},
              {"path": "/", "upstream": "echo"}]
    g = gateway(routes=routes)
    r = g.get("/local")
    assert r.status == 200 and r.body == b"hi"
    assert HEX32.match(r.header("X-Request-Id") or ""), r
    r = g.get("/local", headers=[("X-Request-Id", "given")])
    assert r.header("X-Request-Id") == "given"


def test_global_filter_covers_unrouted_404(gateway):
    g = gateway(routes=[{"path": "/api/", "upstream": "echo"}], filters=[{"request_id": {}}])
    r = g.get("/nowhere")
    assert r.status == 404
    assert HEX32.match(r.header("X-Request-Id") or ""), r
    r = g.get("/api/x")
    assert upstream_ids(r) == [r.header("X-Request-Id")]


def test_ids_unique_across_1000_requests_and_two_workers(gateway):
    routes = [{"path": "/", "respond": {"status": 204}, "filters": [{"request_id": {}}]}]
    g = gateway(routes=routes, workers=2)
    ids, errors = [], []
    lock = threading.Lock()

    def client():
        got = []
        try:
            for _ in range(10):           # 10 connections of 10 requests each
                with g.conn() as c:
                    for _ in range(10):
                        c.request("GET", "/u")
                        got.append(c.read_response("GET").header("X-Request-Id"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        with lock:
            ids.extend(got)

    threads = [threading.Thread(target=client) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert len(ids) == 1000
    assert all(i and HEX32.match(i) for i in ids), [i for i in ids if not (i and HEX32.match(i))][:3]
    assert len(set(ids)) == 1000


@pytest.mark.parametrize("conf,frag", [
    ({"header": "X Id"}, "routes[0].filters[0].request_id.header"),
    ({"header": "Host"}, "routes[0].filters[0].request_id.header"),
    ({"trust_incoming": "no"}, "routes[0].filters[0].request_id.trust_incoming"),
    ({"bogus": 1}, "routes[0].filters[0].request_id"),
    ([], "routes[0].filters[0].request_id"),
])
def test_invalid_config_rejected(portico_bin, tmp_path, conf, frag):
    cfg = make_config(upstreams={"app": {"endpoints": ["127.0.0.1:9"]}},
                      routes=[{"path": "/", "upstream": "app", "filters": [{"request_id": conf}]}])
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    p = subprocess.run([portico_bin, "-t", "-c", str(path)], capture_output=True, timeout=10)
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode == 1, out
    assert any(frag + ":" in ln for ln in out.splitlines()), out
