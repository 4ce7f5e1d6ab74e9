"""Command line (-V, -t, usage) and configuration loading (validation
messages with JSON paths, ${VAR} / @file substitution)."""
import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

import util
from conftest import free_port, make_config

REPO = Path(__file__).resolve().parent.parent.parent


def run(binary, *args, env=None):
    full_env = dict(os.environ)
    full_env.update(env or {})
    p = subprocess.run([binary] + list(args), capture_output=True, timeout=10, env=full_env,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")


def write(tmp_path, cfg, name="c.json"):
    path = tmp_path / name
    path.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg, indent=2))
    return str(path)


def valid_config():
    return make_config(upstreams={"app": {"endpoints": ["127.0.0.1:9"]}},
                       routes=[{"path": "/api/", "upstream": "app"},
                               {"path": "/", "respond": {"status": 200, "body": "hi"}}])


def test_version(portico_bin):
    rc, out = run(portico_bin, "-V")
    assert rc == 0, out
    lines = out.splitlines()
    assert any(re.match(r"^portico \S+", ln) for ln in lines), out
    assert any(ln.lower().startswith("modules:") for ln in lines), out


def test_unknown_option_exit_2_with_usage(portico_bin):
    rc, out = run(portico_bin, "--no-such-option")
    assert rc == 2, out
    assert "usage" in out.lower()
    rc, out = run(portico_bin, "-Z")
    assert rc == 2, out


def test_check_valid_config(portico_bin, tmp_path):
    rc, out = run(portico_bin, "-t", "-c", write(tmp_path, valid_config()))
    assert rc == 0, out
    assert "ok" in out.lower()


def test_check_does_not_start_serving(portico_bin, tmp_path):
    cfg = valid_config()
    port = int(cfg["listeners"][0]["address"].rsplit(":", 1)[1])
    rc, out = run(portico_bin, "-t", "-c", write(tmp_path, cfg))
    assert rc == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.3).close()


def test_shipped_default_config_is_valid(portico_bin):
    rc, out = run(portico_bin, "-t", "-c", str(REPO / "conf" / "portico.json"))
    assert rc == 0, out


def check_fails(binary, tmp_path, cfg, *expect_in_one_line):
    """-t must exit 1 and print a line containing every expected fragment."""
    rc, out = run(binary, "-t", "-c", write(tmp_path, cfg))
    assert rc == 1, "exit %d, output:\n%s" % (rc, out)
    for frags in expect_in_one_line:
        if isinstance(frags, str):
            frags = (frags,)
        assert any(all(f in ln for f in frags) for ln in out.splitlines()), \
            "no line with %r in:\n%s" % (frags, out)
    return out


def test_unknown_top_level_key(portico_bin, tmp_path):
    cfg = valid_config()
    cfg["bogus_key"] = 1
    check_fails(portico_bin, tmp_path, cfg, "bogus_key")


def test_unknown_nested_keys(portico_bin, tmp_path):
    cfg = valid_config()
    cfg["routes"][0]["bogus_route_key"] = True
    check_fails(portico_bin, tmp_path, cfg, ("routes[0]", "bogus_route_key"))
    cfg = valid_config()
    cfg["limits"]["max_bogus"] = 1
    check_fails(portico_bin, tmp_path, cfg, ("limits", "max_bogus"))
    cfg = valid_config()
    cfg["upstreams"]["app"]["bogus_up"] = 1
    check_fails(portico_bin, tmp_path, cfg, ("upstreams", "bogus_up"))


def test_dangling_upstream(portico_bin, tmp_path):
    cfg = valid_config()
    cfg["routes"][0]["upstream"] = "nowhere"
    check_fails(portico_bin, tmp_path, cfg, "routes[0].upstream")


def test_every_problem_reported_with_its_path(portico_bin, tmp_path):
    cfg = valid_config()
    cfg["bogus_key"] = 1
    cfg["routes"][1]["upstream"] = "nowhere"
    del cfg["routes"][1]["respond"]
    cfg["listeners"][0]["address"] = "not an address"
    out = check_fails(portico_bin, tmp_path, cfg, "bogus_key", "routes[1].upstream",
                      "listeners[0].address")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) >= 3


@pytest.mark.parametrize("key,value,path", [
    ("workers", "two", "workers"),
    ("via", "yes", "via"),
    ("log_level", "loud", "log_level"),
    ("trusted_proxies", ["10.0.0.0/33"], "trusted_proxies[0]"),
])
def test_bad_values(portico_bin, tmp_path, key, value, path):
    cfg = valid_config()
    cfg[key] = value
    check_fails(portico_bin, tmp_path, cfg, path)


@pytest.mark.parametrize("mutate,path", [
    (lambda c: c["limits"].update(max_body_bytes=-5), "limits.max_body_bytes"),
    (lambda c: c["upstreams"]["app"].update(endpoints=["nohost"]), ("upstreams", "app", "endpoints")),
    (lambda c: c["routes"][1]["respond"].update(status=99), "routes[1].respond.status"),
    (lambda c: c["routes"][0].update(methods=["GET", 5]), "routes[0].methods[1]"),
    (lambda c: c["access_log"].update(format="xml"), "access_log.format"),
])
def test_bad_nested_values(portico_bin, tmp_path, mutate, path):
    cfg = valid_config()
    mutate(cfg)
    check_fails(portico_bin, tmp_path, cfg, path)


def test_route_needs_upstream_or_respond(portico_bin, tmp_path):
    cfg = valid_config()
    cfg["routes"].append({"path": "/x/"})
    check_fails(portico_bin, tmp_path, cfg, "routes[2]")


def test_invalid_json(portico_bin, tmp_path):
    rc, out = run(portico_bin, "-t", "-c", write(tmp_path, '{"workers": 1,,}'))
    assert rc == 1
    assert out.strip()


def test_missing_file(portico_bin, tmp_path):
    missing = str(tmp_path / "does-not-exist.json")
    rc, out = run(portico_bin, "-t", "-c", missing)
    assert rc == 1
    assert "does-not-exist.json" in out
    rc, out = run(portico_bin, "-c", missing)
    assert rc != 0


def test_invalid_config_refuses_to_start(portico_bin, tmp_path):
    cfg = valid_config()
    cfg["bogus_key"] = 1
    rc, out = run(portico_bin, "-c", write(tmp_path, cfg))
    assert rc != 0 and "bogus_key" in out


def test_port_in_use_fails_to_start(portico, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        cfg = make_config(port=port, routes=[{"path": "/", "respond": {"status": 200, "body": "x"}}])
        p = portico(cfg, wait=False)
        p.expect_exit = True
        rc = p.wait(3.0)
        assert rc is not None and rc != 0, "portico did not fail on a port in use (rc %r)" % rc
        assert p.stderr().strip()
    finally:
        s.close()


# -- substitution ----------------------------------------------------------

def test_env_and_file_substitution(portico, tmp_path):
    port = free_port()
    secret = tmp_path / "secret.txt"
    secret.write_text("from-a-file\n")
    text = json.dumps({
        "workers": 1,
        "listeners": [{"address": "127.0.0.1:${E2E_PORT}"}],
        "limits": {"drain_timeout_ms": 500},
        "upstreams": {},
        "routes": [
            {"path": "/env", "respond": {"status": 200, "body": "hello ${E2E_WHO}!"}},
            {"path": "/default", "respond": {"status": 200, "body": "${E2E_UNSET_VARIABLE:-fallback}"}},
            {"path": "/set-default", "respond": {"status": 200, "body": "${E2E_WHO:-unused}"}},
            {"path": "/file", "respond": {"status": 200, "body": "@" + str(secret)}},
            {"path": "/dollar", "respond": {"status": 200, "body": "cost $$5"}},
            {"path": "/at", "respond": {"status": 200, "body": "@@home"}},
        ],
    })
    env = {"E2E_PORT": str(port), "E2E_WHO": "world"}
    env.pop("E2E_UNSET_VARIABLE", None)
    p = portico(text, env=env, port=port)
    assert util.get(p.port, "/env").body == b"hello world!"
    assert util.get(p.port, "/default").body == b"fallback"
    assert util.get(p.port, "/set-default").body == b"world"
    assert util.get(p.port, "/file").body == b"from-a-file"
    assert util.get(p.port, "/dollar").body == b"cost $5"
    assert util.get(p.port, "/at").body == b"@home"


def test_missing_secret_file_is_an_error(portico_bin, tmp_path):
    cfg = valid_config()
    cfg["routes"][1]["respond"]["body"] = "@" + str(tmp_path / "no-such-secret")
    check_fails(portico_bin, tmp_path, cfg, "routes[1].respond.body")
