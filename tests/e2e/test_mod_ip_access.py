"""ip_access module: allow and deny lists on the real client address (deny
wins), IPv6 and IPv4-mapped clients, the client address taken from
X-Forwarded-For only behind a trusted proxy, global filters, and config
refusals with JSON paths."""
import json
import socket
import subprocess
import time

import pytest

import util
from conftest import free_port, make_config

FORBIDDEN = {"error": "Forbidden", "status": 403}


@pytest.fixture(autouse=True)
def need_module(portico_bin):
    out = subprocess.run([portico_bin, "-V"], capture_output=True, timeout=10).stdout.decode()
    mods = [ln for ln in out.splitlines() if ln.lower().startswith("modules:")]
    if not mods or "ip_access" not in mods[0].replace(",", " ").split():
        pytest.skip("ip_access module not built in")


def ip_route(conf, path="/"):
    return [{"name": "r", "path": path, "upstream": "echo", "filters": [{"ip_access": conf}]}]


def assert_forbidden(r):
    assert r.status == 403, r
    assert r.json() == FORBIDDEN
    assert (r.header("Content-Type") or "").startswith("application/json")


def test_allowed_loopback(gateway):
    g = gateway(routes=ip_route({"allow": ["127.0.0.0/8"], "deny": ["10.0.66.0/24"]}))
    r = g.get("/ok")
    assert r.status == 200
    assert r.json()["target"] == "/ok"


def test_denied_loopback_not_proxied(gateway):
    g = gateway(routes=ip_route({"deny": ["127.0.0.1"]}))
    before = g.echo.stats()["requests"]
    assert_forbidden(g.get("/x"))
    assert_forbidden(g.request("POST", "/x", body="payload"))
    assert g.echo.stats()["requests"] == before


def test_allow_list_without_client(gateway):
    g = gateway(routes=ip_route({"allow": ["10.0.0.0/8", "192.168.0.0/16", "::1/128"]}))
    assert_forbidden(g.get("/x"))


def test_deny_wins_over_allow(gateway):
    g = gateway(routes=ip_route({"allow": ["127.0.0.0/8"], "deny": ["127.0.0.1/32"]}))
    assert_forbidden(g.get("/x"))


def test_deny_other_range_passes(gateway):
    g = gateway(routes=ip_route({"deny": ["10.0.0.0/8", "::1/128", "127.0.0.2"]}))
    assert g.get("/x").status == 200


def test_only_the_filtered_route(gateway):
    g = gateway(routes=[{"path": "/admin/", "upstream": "echo",
                         "filters": [{"ip_access": {"allow": ["10.0.0.0/8"]}}]},
                        {"path": "/", "upstream": "echo"}])
    assert_forbidden(g.get("/admin/users"))
    assert g.get("/public").status == 200


def test_global_filter_before_routing_answers(gateway):
    g = gateway(routes=[{"path": "/api/", "upstream": "echo"}],
                filters=[{"ip_access": {"deny": ["127.0.0.0/8"]}}])
    assert_forbidden(g.get("/api/x"))
    assert_forbidden(g.get("/no-route-here"))


def test_refusal_in_access_log(gateway):
    g = gateway(routes=ip_route({"deny": ["127.0.0.1"]}))
    assert_forbidden(g.get("/logged"))

    def line():
        for ln in g.portico.stdout().splitlines():
            if ln.startswith("{") and "/logged" in ln:
                return json.loads(ln)
        return None
    entry = util.wait_until(line, 3.0)
    assert entry, g.portico.stdout()
    assert entry.get("ip_access") == "denied", entry
    assert entry.get("status") == 403, entry


# ---- the real client address: X-Forwarded-For only from trusted proxies ---

XFF = [("X-Forwarded-For", "203.0.113.7")]


def test_trusted_proxy_xff_is_the_client(gateway):
    g = gateway(routes=ip_route({"deny": ["203.0.113.0/24"]}), trusted_proxies=["127.0.0.1"])
    assert_forbidden(g.get("/x", headers=XFF))
    assert_forbidden(g.get("/x", headers=[("X-Forwarded-For", "198.51.100.1, 203.0.113.7")]))
    assert g.get("/x").status == 200                       # no header: the peer itself
    assert g.get("/x", headers=[("X-Forwarded-For", "198.51.100.1")]).status == 200


def test_trusted_proxy_allow_by_forwarded_address(gateway):
    g = gateway(routes=ip_route({"allow": ["203.0.113.0/24"]}), trusted_proxies=["127.0.0.0/8"])
    assert g.get("/x", headers=XFF).status == 200
    assert_forbidden(g.get("/x"))                          # 127.0.0.1 is not in allow


def test_untrusted_peer_xff_ignored(gateway):
    g = gateway(routes=ip_route({"deny": ["203.0.113.0/24"]}))
    assert g.get("/x", headers=XFF).status == 200          # the client is 127.0.0.1
    g2 = gateway(routes=ip_route({"allow": ["203.0.113.0/24"]}))
    assert_forbidden(g2.get("/x", headers=XFF))            # a client cannot claim an address


def test_ipv4_mapped_forwarded_address_matches_ipv4_ranges(gateway):
    """An IPv4-mapped IPv6 client (here named by a trusted proxy) is matched
    against IPv4 ranges."""
    g = gateway(routes=ip_route({"deny": ["203.0.113.0/24"]}), trusted_proxies=["127.0.0.1"])
    assert_forbidden(g.get("/x", headers=[("X-Forwarded-For", "::ffff:203.0.113.7")]))
    assert g.get("/x", headers=[("X-Forwarded-For", "::ffff:198.51.100.7")]).status == 200
    g2 = gateway(routes=ip_route({"allow": ["2001:db8::/32"]}), trusted_proxies=["127.0.0.1"])
    assert g2.get("/x", headers=[("X-Forwarded-For", "2001:db8::5")]).status == 200
    assert_forbidden(g2.get("/x", headers=[("X-Forwarded-For", "2001:db9::5")]))


def test_proxy_trusted_for_other_range_only(gateway):
    g = gateway(routes=ip_route({"deny": ["203.0.113.0/24"]}), trusted_proxies=["10.0.0.0/8"])
    assert g.get("/x", headers=XFF).status == 200


# ---- IPv6 ------------------------------------------------------------------

def have_ipv6_loopback():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


def exchange(family, host, port, target="/v6"):
    """One GET on a fresh connection of the given family; returns the Response."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect((host, port))
    s.sendall(util.build_request("GET", target, [("Connection", "close")]))
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
    s.close()
    return util.parse_responses(data)[0]


def wait_listening(family, host, port, proc):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.01)
    return False


def start_v6(portico, upstream, address, conf):
    e = upstream("echo.py")
    port = free_port()
    cfg = make_config(routes=ip_route(conf), upstreams={"echo": {"endpoints": [e.addr]}},
                      listeners=[{"address": address % port}])
    p = portico(cfg, wait=False)
    return p, port


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_client(portico, upstream):
    p, port = start_v6(portico, upstream, "[::1]:%d", {"deny": ["::1/128"]})
    assert wait_listening(socket.AF_INET6, "::1", port, p), p.logs()
    assert_forbidden(exchange(socket.AF_INET6, "::1", port))


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_client_allowed_and_not_in_ipv4_ranges(portico, upstream):
    p, port = start_v6(portico, upstream, "[::1]:%d", {"allow": ["::1"], "deny": ["127.0.0.0/8"]})
    assert wait_listening(socket.AF_INET6, "::1", port, p), p.logs()
    assert exchange(socket.AF_INET6, "::1", port).status == 200
    p2, port2 = start_v6(portico, upstream, "[::1]:%d", {"allow": ["127.0.0.0/8"]})
    assert wait_listening(socket.AF_INET6, "::1", port2, p2), p2.logs()
    assert_forbidden(exchange(socket.AF_INET6, "::1", port2))


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv4_mapped_client_matches_ipv4_ranges(portico, upstream):
    """A dual-stack listener on [::] sees an IPv4 client as ::ffff:127.0.0.1;
    IPv4 ranges must still match it."""
    p, port = start_v6(portico, upstream, "[::]:%d", {"deny": ["127.0.0.1/32"]})
    assert wait_listening(socket.AF_INET6, "::1", port, p), p.logs()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        pytest.skip("the [::] listener is IPv6-only here")
    assert_forbidden(exchange(socket.AF_INET, "127.0.0.1", port))
    assert exchange(socket.AF_INET6, "::1", port).status == 200


# ---- config refusals ---------------------------------------------------------

def check_fails(binary, tmp_path, conf, path_fragment, word=None):
    cfg = make_config(upstreams={"echo": {"endpoints": ["127.0.0.1:9"]}},
                      routes=[{"path": "/", "upstream": "echo",
                               "filters": [{"ip_access": conf}]}])
    f = tmp_path / "ip.json"
    f.write_text(json.dumps(cfg, indent=2))
    p = subprocess.run([binary, "-t", "-c", str(f)], capture_output=True, timeout=10,
                       stdin=subprocess.DEVNULL)
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode == 1, out
    full = "routes[0].filters[0].ip_access" + path_fragment
    assert any(full in ln and (word is None or word in ln) for ln in out.splitlines()), \
        "no line with %r (%r) in:\n%s" % (full, word, out)


@pytest.mark.parametrize("conf,path,word", [
    ({}, "", "allow"),
    ({"allow": [], "deny": []}, "", None),
    ({"allow": "10.0.0.0/8"}, ".allow", None),
    ({"allow": ["10.0.0.0/8", "10.0.0.0/33"]}, ".allow[1]", None),
    ({"deny": ["::1/129"]}, ".deny[0]", None),
    ({"deny": ["localhost"]}, ".deny[0]", None),
    ({"deny": ["127.0.0.1", 5]}, ".deny[1]", None),
    ({"deny": ["127.0.0.1"], "permit": ["10.0.0.0/8"]}, ".permit", "unknown"),
])
def test_config_errors(portico_bin, tmp_path, conf, path, word):
    check_fails(portico_bin, tmp_path, conf, path, word)


def test_config_error_not_an_object(portico_bin, tmp_path):
    check_fails(portico_bin, tmp_path, ["10.0.0.0/8"], "", "object")
