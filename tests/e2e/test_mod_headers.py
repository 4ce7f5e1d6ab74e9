"""headers module: set/add/remove on requests (what the echo upstream sees)
and responses (what the client gets), variables in values, global filters,
and config refusals with JSON paths."""
import json
import re
import subprocess

import pytest

from conftest import make_config

HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(autouse=True)
def need_module(portico_bin):
    out = subprocess.run([portico_bin, "-V"], capture_output=True, timeout=10).stdout.decode()
    mods = [ln for ln in out.splitlines() if ln.lower().startswith("modules:")]
    if not mods or "headers" not in mods[0].split():
        pytest.skip("headers module not built in")


def one_route(filters, name="main", path="/"):
    return [{"name": name, "path": path, "upstream": "echo", "filters": filters}]


def test_request_set_add_remove(gateway):
    conf = {"request": {"set": {"X-From": "portico", "X-Over": "gateway"},
                        "add": {"X-Via-Test": "a", "X-Multi": ["1", "2"]},
                        "remove": ["x-debug", "X-Internal"]}}
    g = gateway(routes=one_route([{"headers": conf}]))
    r = g.get("/req", headers=[("X-DEBUG", "secret-debug"), ("X-Over", "client"),
                               ("X-Over", "client2"), ("X-Multi", "0"),
                               ("X-Internal", "secret-internal"), ("X-Keep", "kept")])
    assert r.status == 200
    h = r.echoed_headers()
    assert h["x-from"] == ["portico"]
    assert h["x-over"] == ["gateway"]                  # set replaces every client value
    assert h["x-via-test"] == ["a"]
    assert h["x-multi"] == ["0", "1", "2"]             # add appends
    assert "x-debug" not in h and "x-internal" not in h
    raw = json.dumps(r.json()["headers"])
    assert "secret-debug" not in raw and "secret-internal" not in raw
    assert h["x-keep"] == ["kept"]
    assert "X-From" not in dict(r.headers)           # request edits stay on the request side


def test_remove_then_set_same_name(gateway):
    conf = {"request": {"remove": ["X-Role"], "add": {"X-Role": "user"}}}
    g = gateway(routes=one_route([{"headers": conf}]))
    r = g.get("/role", headers=[("X-Role", "admin")])
    assert r.echoed_headers()["x-role"] == ["user"]


def test_response_set_add_remove(gateway):
    conf = {"response": {"remove": ["X-Upstream", "x-secret"], "set": {"Server": "portico"},
                         "add": {"X-Added": "yes", "X-Twice": ["1", "2"]}}}
    g = gateway(routes=one_route([{"headers": conf}]))
    r = g.get("/headers-out?X-Upstream=1&Server=upstream-srv&X-Secret=s&X-Other=o")
    assert r.status == 200
    assert r.header("X-Upstream") is None
    assert r.header("X-Secret") is None
    assert r.header_all("Server") == ["portico"]
    assert r.header("X-Added") == "yes"
    assert r.header_all("X-Twice") == ["1", "2"]
    assert r.header("X-Other") == "o"
    assert r.json()["method"] == "GET"                 # the body is untouched
    assert "x-added" not in r.echoed_headers()        # response edits stay on the response


def test_response_edits_on_local_answer(gateway):
    routes = [{"name": "hello", "path": "/hello", "exact": True,
               "respond": {"status": 200, "body": "hi"},
               "filters": [{"headers": {"response": {"set": {"X-Local": "%{route}"}}}}]},
              {"path": "/", "upstream": "echo"}]
    g = gateway(routes=routes)
    r = g.get("/hello")
    assert r.status == 200 and r.body == b"hi"
    assert r.header("X-Local") == "hello"


def test_variables_expanded(gateway):
    conf = {"request": {"set": {"X-Client": "%{client_ip}", "X-Route": "%{route}",
                                "X-Host": "%{host}", "X-Method": "%{method}",
                                "X-Path": "%{path}", "X-Unset": "[%{nothing.here}]",
                                "X-Pct": "100%% %{method}%%", "X-Mix": "a%{method}b%{route}c",
                                "X-Literal": "%%{route}"}},
            "response": {"set": {"X-Resp-Route": "route=%{route}", "X-Resp-Path": "%{path}"}}}
    g = gateway(routes=one_route([{"headers": conf}], name="vars", path="/v/"))
    r = g.request("POST", "/v/p/q?a=1", host="H.Example", body="x")
    h = r.echoed_headers()
    assert h["x-client"] == ["127.0.0.1"]
    assert h["x-route"] == ["vars"]
    assert h["x-host"] == ["h.example"]
    assert h["x-method"] == ["POST"]
    assert h["x-path"] == ["/v/p/q"]
    assert h["x-unset"] == ["[]"]
    assert h["x-pct"] == ["100% POST%"]
    assert h["x-mix"] == ["aPOSTbvarsc"]
    assert h["x-literal"] == ["%{route}"]
    assert r.header("X-Resp-Route") == "route=vars"
    assert r.header("X-Resp-Path") == "/v/p/q"


def test_variable_values_differ_per_request(gateway):
    g = gateway(routes=one_route([{"headers": {"request": {"set": {"X-P": "%{path}"}}}}]))
    for p in ("/one", "/two/three", "/4"):
        assert g.get(p).echoed_headers()["x-p"] == [p]


def test_request_id_variable_when_request_id_runs_first(gateway, portico_bin):
    out = subprocess.run([portico_bin, "-V"], capture_output=True, timeout=10).stdout.decode()
    if "request_id" not in out:
        pytest.skip("request_id module not built in")
    conf = {"request": {"set": {"X-Rid": "rid=%{request_id}", "X-Trace": "%{trace_id}"}},
            "response": {"set": {"X-Rid-Back": "%{request_id}"}}}
    g = gateway(routes=one_route([{"request_id": {}}, {"headers": conf}]))
    r = g.get("/rid")
    rid = r.header("X-Request-Id")
    assert rid and HEX32.match(rid), r
    h = r.echoed_headers()
    assert h["x-rid"] == ["rid=" + rid]
    assert h["x-trace"] == [h["traceparent"][0].split("-")[1]]
    assert r.header("X-Rid-Back") == rid
    # In the other order the variable is not set yet when headers runs.
    g2 = gateway(routes=one_route([{"headers": conf}, {"request_id": {}}]))
    r = g2.get("/rid")
    assert r.echoed_headers()["x-rid"] == ["rid="]


def test_global_filter_applies_to_every_route(gateway):
    glob = {"headers": {"request": {"set": {"X-Global": "%{route}", "X-Order": "global"}},
                        "response": {"set": {"X-Global-Resp": "1"}}}}
    routes = [{"name": "a", "path": "/a/", "upstream": "echo",
               "filters": [{"headers": {"request": {"set": {"X-Order": "route"}}}}]},
              {"name": "b", "path": "/b/", "upstream": "echo"},
              {"name": "c", "path": "/c", "exact": True, "respond": {"status": 200, "body": "c"}}]
    g = gateway(routes=routes, filters=[glob])
    ra = g.get("/a/x")
    assert ra.echoed_headers()["x-global"] == ["a"]
    assert ra.echoed_headers()["x-order"] == ["route"]   # global runs first, the route's after
    assert ra.header("X-Global-Resp") == "1"
    rb = g.get("/b/x")
    assert rb.echoed_headers()["x-global"] == ["b"]
    assert rb.echoed_headers()["x-order"] == ["global"]
    assert rb.header("X-Global-Resp") == "1"
    rc = g.get("/c")
    assert rc.body == b"c" and rc.header("X-Global-Resp") == "1"


def check_refused(portico_bin, tmp_path, cfg, *frags):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    p = subprocess.run([portico_bin, "-t", "-c", str(path)], capture_output=True, timeout=10)
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode == 1, out
    assert any(all(f in ln for f in frags) for ln in out.splitlines()), \
        "no line with %r in:\n%s" % (frags, out)


P = "routes[0].filters[0].headers"


@pytest.mark.parametrize("conf,frags", [
    ({"request": {"set": {"Host": "evil"}}}, (P + ".request.set:", "Host")),
    ({"request": {"add": {"transfer-encoding": "chunked"}}}, (P + ".request.add:", "Transfer-Encoding")),
    ({"response": {"remove": ["Content-Length"]}}, (P + ".response.remove:", "Content-Length")),
    ({"response": {"set": {"Connection": "close"}}}, (P + ".response.set:", "Connection")),
    ({"request": {"set": {"Upgrade": "x"}}}, (P + ".request.set:", "Upgrade")),
    ({"request": {"set": {"X-A": "a\r\nX-Injected: 1"}}}, (P + ".request.set:", "CR")),
    ({"request": {"set": {"Bad Name": "v"}}}, (P + ".request.set:", "Bad Name")),
    ({"request": {"set": {"X-A": "50%"}}}, (P + ".request.set:", "%")),
    ({"request": {"set": {"X-A": "%{oops"}}}, (P + ".request.set:",)),
    ({"request": {"set": {"X-A": 5}}}, (P + ".request.set:", "string")),
    ({"request": {"remove": "X-A"}}, (P + ".request.remove:",)),
    ({"request": {}}, (P + ".request:", "no action")),
    ({"reqest": {"set": {"X-A": "1"}}}, (P + ":", "reqest")),
    ({}, (P + ":",)),
])
def test_invalid_config_rejected(portico_bin, tmp_path, conf, frags):
    cfg = make_config(upstreams={"app": {"endpoints": ["127.0.0.1:9"]}},
                      routes=[{"path": "/", "upstream": "app", "filters": [{"headers": conf}]}])
    check_refused(portico_bin, tmp_path, cfg, *frags)


def test_invalid_global_filter_rejected(portico_bin, tmp_path):
    cfg = make_config(upstreams={"app": {"endpoints": ["127.0.0.1:9"]}},
                      routes=[{"path": "/", "upstream": "app"}],
                      filters=[{"headers": {"request": {"add": {"Keep-Alive": "1"}}}}])
    check_refused(portico_bin, tmp_path, cfg, "filters[0].headers.request.add:", "Keep-Alive")


def test_valid_config_accepted(portico_bin, tmp_path):
    conf = {"request": {"set": {"X-From": "portico"}, "add": {"Via": "portico"},
                        "remove": ["X-Debug"]},
            "response": {"set": {"X-Served-By": "%{route}"}, "remove": ["Server"]}}
    cfg = make_config(upstreams={"app": {"endpoints": ["127.0.0.1:9"]}},
                      routes=[{"path": "/", "upstream": "app", "filters": [{"headers": conf}]}])
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    p = subprocess.run([portico_bin, "-t", "-c", str(path)], capture_output=True, timeout=10)
    assert p.returncode == 0, (p.stdout + p.stderr).decode(errors="replace")
