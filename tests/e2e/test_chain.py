"""The filter chain, driven through the example module (modules/example.c):
order of request and response hooks, continuing, answering from a request
or a response hook, pausing (resume, answer, client gone while paused, many
at once), request-body hooks, and how the command line reports modules.

Every example filter adds "X-Example-Trace: <name>:request" to what goes
upstream and "X-Example-Trace: <name>:response" to the answer, so the order
the chain ran in is visible on both sides."""
import json
import os
import re
import socket
import struct
import subprocess
import time

import pytest

import util
from conftest import make_config

SHIPPED = ["request_id", "headers", "cors", "ip_access", "example"]


def run(binary, *args):
    p = subprocess.run([binary] + list(args), capture_output=True, timeout=10,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")


def modules_listed(binary):
    """The module names `portico -V` lists on its "modules:" line."""
    rc, out = run(binary, "-V")
    assert rc == 0, out
    for ln in out.splitlines():
        if ln.lower().startswith("modules:"):
            return [w for w in re.split(r"[\s,]+", ln.split(":", 1)[1]) if w]
    raise AssertionError("no 'modules:' line in portico -V output:\n" + out)


@pytest.fixture(scope="module", autouse=True)
def needs_example(portico_bin):
    if "example" not in modules_listed(portico_bin):
        pytest.skip("the example module is not built into %s" % portico_bin)


def ex(name, **kw):
    """One example filter entry for a "filters" list."""
    return {"example": dict({"name": name}, **kw)}


def chain(gateway, route_filters, global_filters=None, extra_routes=(), **top):
    """A gateway whose "/" route (to the echo upstream) has route_filters;
    global_filters go to the top level."""
    routes = list(extra_routes) + [{"path": "/", "upstream": "echo", "filters": route_filters}]
    if global_filters is not None:
        top["filters"] = global_filters
    return gateway(routes=routes, **top)


def upstream_trace(resp):
    return resp.echoed_headers().get("x-example-trace", [])


def response_trace(resp):
    return resp.header_all("X-Example-Trace")


def upstream_requests(g):
    return g.echo.stats()["requests"]


def access_entries(g, path, n=1, timeout=3.0):
    """The access-log entries (portico's stdout) whose path starts with path;
    waits for n of them, stopping portico (which flushes) if they are late."""
    def found():
        out = []
        for ln in g.portico.stdout().splitlines():
            try:
                e = json.loads(ln)
            except ValueError:
                continue
            if isinstance(e, dict) and str(e.get("path", "")).startswith(path):
                out.append(e)
        return out
    if not util.wait_until(lambda: len(found()) >= n, timeout):
        g.portico.stop()
    got = found()
    assert len(got) >= n, "expected %d access-log lines for %s, got:\n%s" % (
        n, path, g.portico.stdout()[-4000:])
    return got


# -- order ---------------------------------------------------------------------

def test_order_global_then_route_response_reversed(gateway):
    g = chain(gateway, [ex("r1"), ex("r2")], global_filters=[ex("g1"), ex("g2")])
    r = g.get("/order")
    assert r.status == 200, r
    assert upstream_trace(r) == ["g1:request", "g2:request", "r1:request", "r2:request"]
    assert response_trace(r) == ["r2:response", "r1:response", "g2:response", "g1:response"]
    (e,) = access_entries(g, "/order")
    for name in ("g1", "g2", "r1", "r2"):
        assert e.get("example_%s" % name) == "logged", e


def test_route_filters_stay_on_their_route(gateway):
    other = {"path": "/other/", "upstream": "echo", "filters": [ex("o")]}
    g = chain(gateway, [ex("r")], global_filters=[ex("g")], extra_routes=[other])
    r = g.get("/other/x")
    assert upstream_trace(r) == ["g:request", "o:request"]
    assert response_trace(r) == ["o:response", "g:response"]
    r = g.get("/x")
    assert upstream_trace(r) == ["g:request", "r:request"]
    assert response_trace(r) == ["r:response", "g:response"]


def test_continue_and_mark(gateway):
    g = chain(gateway, [ex("a", on_response="mark"), ex("b")])
    r = g.get("/headers-out?X-From-Upstream=yes")
    assert r.status == 200
    assert r.header("X-From-Upstream") == "yes"   # the proxied answer is kept
    assert r.header_all("X-Example-Mark") == ["a"]
    assert response_trace(r) == ["b:response", "a:response"]
    assert r.json()["method"] == "GET"
    assert upstream_requests(g) == 1


def test_global_filters_reach_a_404(gateway):
    g = gateway(routes=[{"path": "/api/", "upstream": "echo"}], filters=[ex("g")])
    r = g.get("/nowhere")
    assert r.status == 404
    assert response_trace(r) == ["g:response"]
    assert upstream_requests(g) == 0


def test_filters_on_a_local_route(gateway):
    local = {"path": "/hello", "exact": True, "respond": {"status": 200, "body": "hi"},
             "filters": [ex("l")]}
    g = gateway(routes=[local, {"path": "/", "upstream": "echo"}], filters=[ex("g")])
    r = g.get("/hello")
    assert r.status == 200 and r.body == b"hi"
    assert response_trace(r) == ["l:response", "g:response"]
    assert upstream_requests(g) == 0


def test_worker_init_once_per_worker(gateway):
    g = chain(gateway, [ex("a"), ex("b")], workers=2, log_level="debug")
    assert g.get("/w").status == 200

    def ids():
        return re.findall(r"example: worker (\d+) ready", g.portico.stderr())
    util.wait_until(lambda: len(ids()) >= 2, 2.0)
    # Once per worker thread, not per filter.
    assert sorted(ids()) == sorted(set(ids())) and len(ids()) == 2, g.portico.stderr()[-3000:]


# -- answering from on_request -------------------------------------------------

def test_respond_from_request_skips_the_rest(gateway):
    g = chain(gateway, [ex("a"), ex("b", on_request="respond", status=418), ex("c")],
              global_filters=[ex("g")])
    r = g.get("/answered")
    assert r.status == 418, r
    assert b"example filter b" in r.body
    assert r.header("Content-Type", "").startswith("text/plain")
    # c never ran. The response hooks of the filters that let the request
    # through run, in reverse; the one that answered wrote its own answer.
    assert response_trace(r) == ["a:response", "g:response"]
    assert upstream_requests(g) == 0
    (e,) = access_entries(g, "/answered")
    assert e["status"] == 418
    # on_log runs for every filter whose on_request ran, and only those.
    assert e.get("example_a") == "logged" and e.get("example_b") == "logged"
    assert "example_c" not in e, e


def test_respond_from_request_keeps_the_connection(gateway):
    teapot = {"path": "/teapot", "upstream": "echo",
              "filters": [ex("t", on_request="respond", status=418)]}
    g = chain(gateway, [ex("a")], extra_routes=[teapot])
    with g.conn() as c:
        for _ in range(3):
            c.request("GET", "/teapot")
            assert c.read_response().status == 418
            c.request("GET", "/through")
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == "/through"
    assert upstream_requests(g) == 3


def test_respond_with_a_request_body_unread(gateway):
    g = chain(gateway, [ex("a", on_request="respond", status=403)])
    with g.conn() as c:
        c.request("POST", "/upload", body=b"x" * 20000)
        r = c.read_response()
        assert r.status == 403
        # The connection is either still usable (body discarded) or closed;
        # it must never take the unread body as the next request.
        try:
            c.request("GET", "/next")
            r2 = c.read_response()
        except (util.ProtocolError, OSError):
            r2 = None
        if r2 is not None:
            assert r2.status == 403 and b"example filter a" in r2.body
    assert upstream_requests(g) == 0


# -- pausing ---------------------------------------------------------------------

def test_pause_then_resume(gateway):
    g = chain(gateway, [ex("p", on_request="pause", pause_ms=300), ex("b")],
              global_filters=[ex("g")])
    t0 = time.monotonic()
    r = g.get("/paused")
    elapsed = time.monotonic() - t0
    assert r.status == 200, r
    assert elapsed >= 0.29, elapsed
    # The chain went on after the pause: b ran, then the proxy step.
    assert upstream_trace(r) == ["g:request", "p:request", "b:request"]
    assert response_trace(r) == ["b:response", "p:response", "g:response"]
    assert upstream_requests(g) == 1


def test_pause_zero_ms_resumes(gateway):
    g = chain(gateway, [ex("p", on_request="pause", pause_ms=0), ex("q", on_request="pause",
                                                                    pause_ms=0)])
    with g.conn() as c:
        for i in range(20):
            c.request("GET", "/z%d" % i)
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == "/z%d" % i
            assert upstream_trace(r) == ["p:request", "q:request"]


def test_pause_then_respond(gateway):
    g = chain(gateway, [ex("a"), ex("p", on_request="pause_respond", pause_ms=250, status=451),
                        ex("c")])
    t0 = time.monotonic()
    r = g.get("/later")
    elapsed = time.monotonic() - t0
    assert r.status == 451, r
    assert elapsed >= 0.24, elapsed
    assert b"example filter p" in r.body
    assert response_trace(r) == ["a:response"]
    assert upstream_requests(g) == 0
    (e,) = access_entries(g, "/later")
    assert e.get("example_p") == "logged" and "example_c" not in e, e


def test_paused_requests_on_one_keepalive_connection(gateway):
    g = chain(gateway, [ex("p", on_request="pause", pause_ms=30)])
    with g.conn() as c:
        for i in range(5):
            c.request("GET", "/k%d" % i)
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == "/k%d" % i
    assert upstream_requests(g) == 5


def _abandon(port, target, reset):
    """Send a request and close before it is answered (RST when reset)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    s.sendall(util.build_request("GET", target))
    time.sleep(0.05)
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


@pytest.mark.parametrize("action", ["pause", "pause_respond"])
def test_client_gone_while_paused(gateway, action):
    pause_ms = 400
    g = chain(gateway, [ex("p", on_request=action, pause_ms=pause_ms, status=200)],
              log_level="debug")
    n = 10
    for i in range(n):
        _abandon(g.port, "/gone%d" % i, reset=bool(i % 2))
    # Past the pause: no timer may have fired into a request that is gone,
    # so nothing was resumed into the proxy step.
    time.sleep(pause_ms / 1000.0 + 0.3)
    assert g.portico.poll() is None, g.portico.logs()
    assert upstream_requests(g) == 0
    freed = util.wait_until(
        lambda: g.portico.stderr().count("request ended while paused; timer freed") >= n, 2.0)
    assert freed, "the cleanup did not free every pending timer:\n" + g.portico.stderr()[-4000:]
    # And the daemon still serves.
    for i in range(3):
        r = g.get("/after%d" % i, timeout=5.0)
        assert r.status == 200
    if action == "pause":
        assert upstream_requests(g) == 3


def test_many_concurrent_paused_requests(gateway):
    n = 200
    pause_ms = 300
    g = chain(gateway, [ex("p", on_request="pause", pause_ms=pause_ms)])
    conns = []
    try:
        t0 = time.monotonic()
        for i in range(n):
            c = util.Conn(g.port, timeout=15.0)
            conns.append(c)
            c.request("GET", "/many/%d" % i)
        for i, c in enumerate(conns):
            r = c.read_response()
            assert r.status == 200, r
            assert r.json()["target"] == "/many/%d" % i
        elapsed = time.monotonic() - t0
    finally:
        for c in conns:
            c.close()
    # All paused at once: far less than n pauses one after another.
    assert pause_ms / 1000.0 <= elapsed < 10.0, elapsed
    assert upstream_requests(g) == n
    assert g.get("/after").status == 200


# -- answering from on_response -----------------------------------------------------

def test_respond_from_response_replaces_the_upstream_answer(gateway):
    g = chain(gateway, [ex("a"), ex("b", on_response="respond", status=451)])
    r = g.get("/headers-out?X-From-Upstream=yes")
    assert r.status == 451, r
    assert b"example filter b" in r.body
    assert r.header("X-From-Upstream") is None
    assert r.header("Content-Type", "").startswith("text/plain")
    # a's response hook runs after b replaced the answer.
    assert "a:response" in response_trace(r)
    assert upstream_requests(g) == 1   # the upstream was reached
    (e,) = access_entries(g, "/headers-out")
    assert e["status"] == 451


@pytest.mark.parametrize("target", ["/big/300000", "/bigchunked/300000", "/x"])
def test_replaced_answer_keeps_the_connection_sane(gateway, target):
    g = chain(gateway, [ex("b", on_response="respond", status=503)])
    with g.conn(timeout=5.0) as c:
        for _ in range(2):
            c.request("GET", target)
            r = c.read_response()
            assert r.status == 503 and r.complete
            assert b"example filter b" in r.body and len(r.body) < 200
    # The upstream's unread body did not poison a pooled connection.
    plain = g.get("/plain")
    assert plain.status == 503 and b"example filter b" in plain.body


# -- request body hook ---------------------------------------------------------

def test_body_bytes_content_length(gateway):
    g = chain(gateway, [ex("a", body_bytes=True), ex("n")])
    body = bytes(range(256)) * 40 + b"tail"
    r = g.request("POST", "/cl", body=body)
    assert r.status == 200
    assert r.json()["body_len"] == len(body)
    (e,) = access_entries(g, "/cl")
    assert e.get("example_a_body_bytes") == str(len(body)), e
    assert "example_n_body_bytes" not in e          # n did not ask to count
    assert e.get("example_n") == "logged"


def test_body_bytes_chunked(gateway):
    g = chain(gateway, [ex("a", body_bytes=True)])
    sizes = [1, 100, 5000, 70000, 3]
    data = b"".join(b"%x\r\n%s\r\n" % (n, b"c" * n) for n in sizes) + b"0\r\n\r\n"
    with g.conn(timeout=5.0) as c:
        c.request("POST", "/chunked", headers={"Transfer-Encoding": "chunked"})
        c.send(data)
        r = c.read_response()
    assert r.status == 200
    assert r.json()["body_len"] == sum(sizes)
    (e,) = access_entries(g, "/chunked")
    # Counted after chunked decoding: the sizes, not the framing bytes.
    assert e.get("example_a_body_bytes") == str(sum(sizes)), e


def test_body_bytes_without_body(gateway):
    g = chain(gateway, [ex("a", body_bytes=True)])
    assert g.get("/nobody").status == 200
    (e,) = access_entries(g, "/nobody")
    assert e.get("example_a_body_bytes") == "0", e


def test_body_bytes_after_pause(gateway):
    g = chain(gateway, [ex("p", on_request="pause", pause_ms=100), ex("a", body_bytes=True)])
    body = b"z" * 123457
    r = g.request("POST", "/pb", body=body, timeout=5.0)
    assert r.status == 200 and r.json()["body_len"] == len(body)
    (e,) = access_entries(g, "/pb")
    assert e.get("example_a_body_bytes") == str(len(body)), e


# -- command line ------------------------------------------------------------

def test_version_lists_the_modules(portico_bin):
    want = os.environ.get("PORTICO_EXPECT_MODULES")
    want = re.split(r"[\s,]+", want.strip()) if want else SHIPPED
    listed = modules_listed(portico_bin)
    for m in want:
        assert m in listed, "%s missing from portico -V: %s" % (m, listed)


def _check(portico_bin, tmp_path, cfg):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg, indent=2))
    return run(portico_bin, "-t", "-c", str(path))


def test_module_not_built_in_is_refused(portico_bin, tmp_path):
    cfg = make_config(upstreams={"app": {"endpoints": ["127.0.0.1:9"]}},
                      routes=[{"path": "/", "upstream": "app",
                               "filters": [ex("a"), {"no_such_module": {}}]}])
    rc, out = _check(portico_bin, tmp_path, cfg)
    assert rc == 1, out
    assert any("no_such_module" in ln and "not built in" in ln for ln in out.splitlines()), out
    cfg = make_config(filters=[{"nope_global": {"x": 1}}], routes=[])
    rc, out = _check(portico_bin, tmp_path, cfg)
    assert rc == 1, out
    assert any("nope_global" in ln and "not built in" in ln for ln in out.splitlines()), out


def test_example_config_errors_name_the_path(portico_bin, tmp_path):
    cfg = make_config(upstreams={"app": {"endpoints": ["127.0.0.1:9"]}},
                      filters=[ex("g", status=99)],
                      routes=[{"path": "/", "upstream": "app",
                               "filters": [ex("a"), ex("b", on_request="bogus")]}])
    rc, out = _check(portico_bin, tmp_path, cfg)
    assert rc == 1, out
    lines = out.splitlines()
    assert any("filters[0].example.status" in ln and "200 to 599" in ln for ln in lines), out
    assert any("routes[0].filters[1].example.on_request" in ln and "must be one of" in ln
               for ln in lines), out


def test_valid_chain_config_passes_check(portico_bin, tmp_path):
    cfg = make_config(upstreams={"app": {"endpoints": ["127.0.0.1:9"]}},
                      filters=[ex("g", on_response="mark")],
                      routes=[{"path": "/", "upstream": "app",
                               "filters": [ex("a", on_request="pause", pause_ms=5,
                                              body_bytes=True)]}])
    rc, out = _check(portico_bin, tmp_path, cfg)
    assert rc == 0, out
