"""packaging/Dockerfile and the example fleet's container files, checked
without a docker daemon (CI has none): the stages, the non-root user, the
runtime libraries against the build stage's -dev packages (apt-cache), the
files COPY needs, the image's default config (portico -t), and the
HEALTHCHECK command itself, run here against a real portico's admin
listener.

What this cannot show: that the image builds and starts. Build it where a
daemon runs: docker build -f packaging/Dockerfile -t portico ."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import dockerfile
import util
from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "packaging" / "Dockerfile"
IMAGE_CONFIG = ROOT / "packaging" / "docker" / "portico.json"
DJANGO = ROOT / "examples" / "django"


@pytest.fixture(scope="module")
def instrs():
    return dockerfile.parse(DOCKERFILE)


def final(instrs, op):
    last = max(i.stage for i in instrs)
    return [i for i in instrs if i.stage == last and i.op == op]


def apt_installed(instrs, stage):
    """Packages named by `apt-get install` in a stage's RUN instructions."""
    pkgs = []
    for i in instrs:
        if i.stage == stage and i.op == "RUN":
            for m in re.finditer(r"apt-get install((?:\s+[-\w.+=]+)+)", i.args):
                pkgs += [w for w in m.group(1).split() if not w.startswith("-")]
    return pkgs


def test_multi_stage_on_debian_12_slim(instrs):
    st = dockerfile.stages(instrs)
    assert len(st) >= 2, st
    assert all(img == "debian:12-slim" for img, _ in st), st
    names = [n for _, n in st]
    assert names[0] == "build" and names[-1] == "runtime", names
    assert "build-essential" in apt_installed(instrs, 0)
    runtime = apt_installed(instrs, len(st) - 1)
    assert runtime and not [p for p in runtime if p.endswith("-dev") or p in (
        "build-essential", "gcc", "make", "autoconf")], runtime
    # The runtime stage takes only the binary from the build stage.
    for c in final(instrs, "COPY"):
        if "--from=" in c.args:
            assert "--from=build" in c.args and "/usr/sbin/portico" in c.args, c


def test_runs_as_a_numeric_non_root_user(instrs):
    users = final(instrs, "USER")
    assert users, "the runtime stage has no USER"
    uid, _, gid = users[-1].args.partition(":")
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert gid.isdigit() and int(gid) != 0, users[-1]
    runs = " ".join(i.args for i in final(instrs, "RUN"))
    assert re.search(r"useradd\b.*--uid %s\b" % uid, runs), "uid %s is not created" % uid
    # USER comes after every RUN of the stage (they need root).
    assert users[-1].line > max(i.line for i in final(instrs, "RUN"))


def test_config_lives_in_etc_portico_and_is_valid(instrs, portico_bin):
    copies = [c for c in final(instrs, "COPY") if "/etc/portico/portico.json" in c.args]
    assert copies, "no config copied to /etc/portico"
    cmd = final(instrs, "CMD")[-1].exec_form()
    assert cmd == ["-c", "/etc/portico/portico.json"], cmd
    assert final(instrs, "ENTRYPOINT")[-1].exec_form() == ["/usr/sbin/portico"]
    r = subprocess.run([portico_bin, "-t", "-c", str(IMAGE_CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_expose_and_health_port_match_the_config(instrs):
    cfg = json.loads(IMAGE_CONFIG.read_text())
    port = cfg["listeners"][0]["address"].rsplit(":", 1)[1]
    assert [e.args for e in final(instrs, "EXPOSE")] == [port]
    envs = " ".join(e.args for e in final(instrs, "ENV"))
    admin = cfg["admin"]["address"]
    assert admin.startswith("127.0.0.1:"), "the admin API stays inside the container"
    assert "PORTICO_ADMIN_PORT=%s" % admin.rsplit(":", 1)[1] in envs
    # docker stop's default grace is 10 s: the default drain fits in it.
    assert cfg["limits"]["drain_timeout_ms"] < 10000


def test_copy_sources_exist(instrs):
    for c in (i for i in instrs if i.op == "COPY" and "--from=" not in i.args):
        for src in c.words()[:-1]:
            if src.startswith("--"):
                continue
            assert src == "." or (ROOT / src).exists(), c


def test_runtime_libraries_match_the_build_dependencies(instrs):
    if not shutil.which("apt-cache"):
        pytest.skip("apt-cache not available")
    dev = [p for p in apt_installed(instrs, 0) if p.startswith("lib") and p.endswith("-dev")]
    runtime = [p for p in apt_installed(instrs, max(i.stage for i in instrs)) if p.startswith("lib")]
    assert dev and runtime
    # One apt-cache run per question: each run loads the whole cache.
    out = subprocess.run(["apt-cache", "policy"] + runtime, capture_output=True, text=True).stdout
    cands = dict(re.findall(r"^(\S+):\n\s+Installed: .*\n\s+Candidate: (\S+)", out, re.M))
    for p in runtime:
        assert cands.get(p, "(none)") != "(none)", "%s: no such package" % p
    out = subprocess.run(["apt-cache", "depends"] + dev, capture_output=True, text=True).stdout
    deps, cur = {}, None
    for ln in out.splitlines():
        if not ln.startswith(" "):
            cur = ln.strip()
            deps[cur] = set()
        elif ln.strip().startswith("Depends:"):
            deps[cur].add(ln.split(":", 1)[1].strip())
    covered = set()
    for d in dev:
        mine = deps.get(d, set()) & set(runtime)
        assert mine, "%s depends on none of the runtime packages %s (its: %s)" % (
            d, runtime, deps.get(d))
        covered |= mine
    assert covered == set(runtime), "runtime packages no -dev needs: %s" % (set(runtime) - covered)


def run_healthcheck(instrs, admin_port):
    cmd = final(instrs, "HEALTHCHECK")[-1]
    argv = json.loads(cmd.args.split("CMD", 1)[1].strip())
    env = dict(os.environ, PORTICO_ADMIN_PORT=str(admin_port))
    return subprocess.run(argv, env=env, capture_output=True, timeout=10).returncode


def test_healthcheck_asks_the_admin_healthz(instrs, portico):
    hc = final(instrs, "HEALTHCHECK")
    assert hc and "CMD" in hc[-1].args, "no HEALTHCHECK in the runtime stage"
    assert "/healthz" in hc[-1].args
    cfg = json.loads(IMAGE_CONFIG.read_text())
    port, admin = free_port(), free_port()
    cfg["listeners"] = [{"address": "127.0.0.1:%d" % port}]
    cfg["admin"] = {"address": "127.0.0.1:%d" % admin}
    cfg["routes"] = [{"path": "/", "respond": {"status": 404}}]
    cfg["workers"] = 1
    p = portico(cfg)
    assert util.wait_until(lambda: run_healthcheck(instrs, admin) == 0, 5)
    # A port that answers, but not 200 (the proxy listener's 404): unhealthy.
    assert run_healthcheck(instrs, port) != 0
    p.stop()
    assert run_healthcheck(instrs, admin) != 0


# ---------------------------------------------------------------- the example fleet

def test_django_image_is_non_root_with_a_healthcheck():
    ins = dockerfile.parse(DJANGO / "Dockerfile")
    user = [i for i in ins if i.op == "USER"][-1].args.split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert [i for i in ins if i.op == "HEALTHCHECK"]
    for c in (i for i in ins if i.op == "COPY"):
        assert (DJANGO / c.words()[0]).exists(), c


def test_compose_fleet_is_consistent():
    comp = yaml.safe_load((DJANGO / "docker-compose.yml").read_text())
    svcs = comp["services"]
    assert {"redis", "users", "orders-1", "orders-2", "portico"} <= set(svcs)
    ip = {n: s["networks"]["fleet"]["ipv4_address"] for n, s in svcs.items()
          if isinstance(s.get("networks"), dict) and "fleet" in s["networks"]}
    env = svcs["portico"]["environment"]
    assert env["USERS_ADDR"] == ip["users"] + ":8000"
    assert env["ORDERS1_ADDR"] == ip["orders-1"] + ":8000"
    assert env["ORDERS2_ADDR"] == ip["orders-2"] + ":8000"
    assert env["REDIS_ADDR"] == ip["redis"] + ":6379"
    # Every variable portico.json needs without a default is provided.
    text = (DJANGO / "portico.json").read_text()
    needed = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))
    assert needed and needed <= set(env), needed - set(env)
    # The config is mounted where the image reads it; only Portico publishes a port.
    assert "./portico.json:/etc/portico/portico.json:ro" in svcs["portico"]["volumes"]
    assert [n for n, s in svcs.items() if s.get("ports")] == ["portico"]
    assert all(p.startswith("127.0.0.1:") for p in svcs["portico"]["ports"])
    # The services run gunicorn on the port Portico is told about.
    for n in ("users", "orders-1", "orders-2"):
        assert "0.0.0.0:8000" in " ".join(svcs[n]["command"]), n
    assert svcs["portico"]["build"]["dockerfile"] == "packaging/Dockerfile"
