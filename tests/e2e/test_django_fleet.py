"""The Django example fleet (examples/django): two Django REST framework
services under gunicorn, Redis, and Portico in front, started by
examples/django/run on free ports.

Two tiers:
- the services alone (run --services-only): they refuse anything that did
  not come through Portico (X-Portico-Secret), issue RS256 tokens signed
  with the key run generated, keep orders per user in one database shared
  by both orders instances, answer /healthz, and run stops them all;
- the whole fleet through Portico: register, token, create and list
  orders, 401 without a token, 429 past the per-user limit, no error while
  an orders instance is killed. It needs the jwt_auth and rate_limit
  modules in the binary under test and skips, saying so, without them;
  the kill part needs upstream retries and skips while `portico -t`
  refuses an upstream "retry" key.
"""
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import util
from conftest import PYTHON, Proc, free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "django"
RUN = EXAMPLE / "run"
HOST = "127.0.0.1"   # in the services' ALLOWED_HOSTS
NEEDED_MODULES = ("jwt_auth", "rate_limit", "headers", "request_id")


def _python_has(*mods):
    code = "import " + ", ".join(mods)
    return subprocess.run([PYTHON, "-c", code], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(
    not _python_has("django", "rest_framework", "jwt", "gunicorn") or not os.path.exists(
        "/usr/bin/redis-server"),
    reason="the Django example needs python3-django python3-djangorestframework python3-jwt "
           "gunicorn redis-server (scripts/install-deps.sh installs them)")


def modules_of(binary):
    out = subprocess.run([binary, "-V"], capture_output=True, timeout=10, text=True).stdout
    for ln in out.splitlines():
        if ln.startswith("modules:"):
            return set(ln.split(":", 1)[1].split())
    return set()


class Fleet:
    """examples/django/run as a child process, on free ports."""

    def __init__(self, tmp_path, args=(), portico_bin=None, config=None):
        self.state = tmp_path / "state"
        self.ports = {k: free_port() for k in
                      ("PORTICO_PORT", "PORTICO_ADMIN_PORT", "USERS_PORT", "ORDERS1_PORT",
                       "ORDERS2_PORT", "REDIS_PORT")}
        env = dict(os.environ, STATE_DIR=str(self.state), **{k: str(v) for k, v in self.ports.items()})
        if portico_bin:
            env["PORTICO"] = portico_bin
        if config:
            env["PORTICO_CONFIG"] = str(config)
        self.env = env
        self.proc = Proc("django-run", ["bash", str(RUN)] + list(args), tmp_path, env=env)

    def wait_for(self, text, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.proc.stderr():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError("fleet did not start (%r not seen)\n%s\n%s"
                             % (text, self.proc.logs(), self.service_logs()))

    def service_logs(self):
        out = []
        for f in sorted((self.state / "logs").glob("*.log")) if (self.state / "logs").exists() else []:
            out.append("--- %s:\n%s" % (f.name, f.read_text(errors="replace")[-4000:]))
        return "\n".join(out)

    def secrets(self):
        pairs = (ln.split("=", 1) for ln in (self.state / "secrets.env").read_text().splitlines() if ln)
        return dict(pairs)

    def pid(self, name):
        return int((self.state / "pids" / ("%s.pid" % name)).read_text())

    def stop(self):
        """SIGTERM run; it must exit and take every process group it made."""
        pids = {p.stem: int(p.read_text()) for p in (self.state / "pids").glob("*.pid")}
        if self.proc.poll() is None:
            self.proc.signal(signal.SIGTERM)
        rc = self.proc.wait(30)
        if rc is None:
            self.proc.kill()
        left = []
        for name, pid in pids.items():
            if util.wait_until(lambda: not _alive(pid), 10):
                continue
            left.append(name)
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.finish()
        return rc, left


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours counts as gone.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def call(port, method, target, body=None, headers=None, timeout=15.0):
    hdrs = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body)
        hdrs["Content-Type"] = "application/json"
    return util.request(port, method, target, headers=hdrs, body=data, host=HOST, timeout=timeout)


# ---------------------------------------------------------------- services alone

@pytest.fixture(scope="module")
def services(tmp_path_factory):
    # One set of services for the tests of this tier (they use distinct
    # users): starting Django and gunicorn takes seconds.
    f = Fleet(tmp_path_factory.mktemp("services"), args=["--services-only"])
    try:
        f.wait_for("run: services up")
    except AssertionError:
        f.stop()
        raise
    yield f
    rc, left = f.stop()
    assert not left, "run left these running after SIGTERM: %s" % left


def test_services_accept_only_requests_from_portico(services):
    users = services.ports["USERS_PORT"]
    orders = services.ports["ORDERS1_PORT"]
    cred = {"username": "mallory", "password": "password123"}
    r = call(users, "POST", "/api/users/register", cred)
    assert r.status == 401, r
    assert b"through Portico" in r.body
    r = call(users, "POST", "/api/users/register", cred, {"X-Portico-Secret": "x" * 48})
    assert r.status == 401, r
    # A forged user id without the secret is not believed either.
    r = call(orders, "GET", "/api/orders/", headers={"X-User-Id": "1"})
    assert r.status == 401, r
    # With the secret but no user id: authenticated routes still refuse.
    secret = services.secrets()["PORTICO_UPSTREAM_SECRET"]
    r = call(orders, "GET", "/api/orders/", headers={"X-Portico-Secret": secret})
    assert r.status == 401, r
    r = call(orders, "GET", "/api/orders/",
             headers={"X-Portico-Secret": secret, "X-User-Id": "1; DROP"})
    assert r.status == 401, r


def test_token_is_rs256_and_verifies_with_the_generated_public_key(services):
    import jwt

    users = services.ports["USERS_PORT"]
    h = {"X-Portico-Secret": services.secrets()["PORTICO_UPSTREAM_SECRET"]}
    r = call(users, "POST", "/api/users/register", {"username": "alice", "password": "wonderland1"}, h)
    assert r.status == 201, r
    uid = r.json()["id"]
    r = call(users, "POST", "/api/users/register", {"username": "alice", "password": "other-pass1"}, h)
    assert r.status == 409, r
    r = call(users, "POST", "/api/users/token", {"username": "alice", "password": "wrong-pass"}, h)
    assert r.status == 401, r
    r = call(users, "POST", "/api/users/token", {"username": "alice", "password": "wonderland1"}, h)
    assert r.status == 200, r
    tok = r.json()["access_token"]
    assert jwt.get_unverified_header(tok)["alg"] == "RS256"
    pub = (services.state / "jwt-public.pem").read_bytes()
    claims = jwt.decode(tok, pub, algorithms=["RS256"], audience="portico-example-api",
                        issuer="portico-example-users")
    assert claims["sub"] == str(uid)
    assert claims["exp"] > time.time() + 3000
    # What Portico would forward after verifying that token.
    r = call(users, "GET", "/api/users/me", headers=dict(h, **{"X-User-Id": str(uid)}))
    assert r.status == 200 and r.json()["username"] == "alice", r
    # The private key stays private.
    assert (services.state / "jwt-private.pem").stat().st_mode & 0o077 == 0


def test_orders_are_per_user_in_one_database_for_both_instances(services):
    o1, o2 = services.ports["ORDERS1_PORT"], services.ports["ORDERS2_PORT"]
    secret = services.secrets()["PORTICO_UPSTREAM_SECRET"]
    as_user = lambda uid: {"X-Portico-Secret": secret, "X-User-Id": str(uid)}  # noqa: E731
    r = call(o1, "POST", "/api/orders/", {"item": "book", "quantity": 2}, as_user(7))
    assert r.status == 201, r
    assert r.header("X-Served-By") == "orders-1"
    oid = r.json()["id"]
    r = call(o2, "POST", "/api/orders/", {"item": "pen", "quantity": 1}, as_user(8))
    assert r.status == 201 and r.header("X-Served-By") == "orders-2", r
    r = call(o2, "GET", "/api/orders/", headers=as_user(7))
    assert r.status == 200, r
    assert [o["item"] for o in r.json()["results"]] == ["book"]
    assert call(o2, "GET", "/api/orders/%d" % oid, headers=as_user(7)).status == 200
    assert call(o1, "GET", "/api/orders/%d" % oid, headers=as_user(8)).status == 404
    r = call(o1, "POST", "/api/orders/", {"item": "x", "quantity": 0}, as_user(7))
    assert r.status == 400, r


def test_healthz_on_every_service(services):
    for key, name in (("USERS_PORT", "users"), ("ORDERS1_PORT", "orders"), ("ORDERS2_PORT", "orders")):
        r = call(services.ports[key], "GET", "/healthz")
        assert r.status == 200 and r.json() == {"status": "ok", "service": name}, r


def test_run_refuses_a_portico_without_the_modules(tmp_path, portico_bin):
    missing = [m for m in NEEDED_MODULES if m not in modules_of(portico_bin)]
    if not missing:
        pytest.skip("this binary has every module the example needs")
    env = dict(os.environ, PORTICO=portico_bin, STATE_DIR=str(tmp_path / "state"))
    r = subprocess.run(["bash", str(RUN)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "lacks the module(s) %s" % " ".join(missing) in r.stderr
    assert not (tmp_path / "state").exists(), "nothing may start before the check"


# ---------------------------------------------------------------- through Portico

@pytest.fixture
def need_fleet_modules(portico_bin):
    missing = [m for m in NEEDED_MODULES if m not in modules_of(portico_bin)]
    if missing:
        pytest.skip("the fleet needs the %s module(s), not built into %s (portico -V)"
                    % (", ".join(missing), portico_bin))


def start_fleet(tmp_path, portico_bin, config=None):
    f = Fleet(tmp_path, portico_bin=portico_bin, config=config)
    try:
        f.wait_for("run: fleet up")
        if not util.wait_until(lambda: _accepts(f.ports["PORTICO_PORT"]), 10):
            raise AssertionError("portico is not listening\n" + f.proc.logs())
    except AssertionError:
        f.stop()
        raise
    return f


def _accepts(port):
    try:
        util.Conn(port, timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture
def fleet(tmp_path, portico_bin, need_fleet_modules):
    f = start_fleet(tmp_path, portico_bin)
    yield f
    rc, left = f.stop()
    assert not left, "run left these running after SIGTERM: %s" % left


def signup(port, name):
    r = call(port, "POST", "/api/users/register", {"username": name, "password": "s3cret-pass"})
    assert r.status == 201, r
    r = call(port, "POST", "/api/users/token", {"username": name, "password": "s3cret-pass"})
    assert r.status == 200, r
    return {"Authorization": "Bearer " + r.json()["access_token"]}


def test_fleet_end_to_end(fleet, tmp_path):
    port = fleet.ports["PORTICO_PORT"]
    alice = signup(port, "alice")
    bob = signup(port, "bob")
    r = call(port, "POST", "/api/orders/", {"item": "book", "quantity": 2}, alice)
    assert r.status == 201, r
    r = call(port, "POST", "/api/orders/", {"item": "lamp", "quantity": 1}, bob)
    assert r.status == 201, r
    r = call(port, "GET", "/api/orders/", headers=alice)
    assert r.status == 200, r
    assert [o["item"] for o in r.json()["results"]] == ["book"]
    r = call(port, "GET", "/api/users/me", headers=alice)
    assert r.status == 200 and r.json()["username"] == "alice", r
    # The admin API the container HEALTHCHECK asks.
    assert util.get(fleet.ports["PORTICO_ADMIN_PORT"], "/healthz").status == 200
    # No token, a garbage token, a token signed by another key: 401 at Portico.
    assert call(port, "GET", "/api/orders/").status == 401
    assert call(port, "GET", "/api/orders/", headers={"Authorization": "Bearer x.y.z"}).status == 401
    import jwt
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-out", str(other)], check=True,
                   capture_output=True)
    forged = jwt.encode({"iss": "portico-example-users", "aud": "portico-example-api", "sub": "1",
                         "exp": int(time.time()) + 600}, other.read_bytes(), algorithm="RS256")
    assert call(port, "GET", "/api/orders/",
                headers={"Authorization": "Bearer " + forged}).status == 401
    # A client's own X-User-Id is dropped: alice cannot read bob's orders.
    r = call(port, "GET", "/api/orders/", headers=dict(alice, **{"X-User-Id": "2"}))
    assert r.status == 200 and [o["item"] for o in r.json()["results"]] == ["book"], r


def test_fleet_rate_limit_per_user(fleet):
    port = fleet.ports["PORTICO_PORT"]
    carol = signup(port, "carol")
    dave = signup(port, "dave")
    statuses = [call(port, "GET", "/api/orders/", headers=carol).status for _ in range(40)]
    assert statuses[0] == 200
    assert 429 in statuses, statuses
    assert set(statuses) <= {200, 429}, statuses
    # Another user has a budget of their own.
    assert call(port, "GET", "/api/orders/", headers=dave).status == 200


def retry_config(tmp_path, portico_bin, fleet_env):
    """examples/django/portico.json as shipped (its orders upstream retries
    idempotent calls on the other instance), or None when this binary
    refuses the "retry" key."""
    cfg = json.loads((EXAMPLE / "portico.json").read_text())
    assert "retry" in cfg["upstreams"]["orders"], "the example must retry on the other instance"
    path = tmp_path / "portico-retry.json"
    path.write_text(json.dumps(cfg, indent=2))
    r = subprocess.run([portico_bin, "-t", "-c", str(path)], capture_output=True, text=True,
                       env=fleet_env, timeout=10)
    if r.returncode != 0 and "retry" in r.stderr:
        return None, r.stderr
    assert r.returncode == 0, "the example config with retries is invalid:\n" + r.stderr
    return path, r.stderr


def test_fleet_no_client_error_while_an_orders_instance_dies(tmp_path, portico_bin,
                                                             need_fleet_modules):
    # -t needs the substituted variables to exist: any values do for a check.
    env = dict(os.environ, REDIS_PASSWORD="x", PORTICO_UPSTREAM_SECRET="y" * 24,
               JWT_PUBLIC_KEY_FILE=str(tmp_path / "k.pem"))
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-out", str(tmp_path / "p.pem")],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "p.pem"), "-pubout", "-out",
                    str(tmp_path / "k.pem")], check=True, capture_output=True)
    path, err = retry_config(tmp_path, portico_bin, env)
    if path is None:
        pytest.skip("upstream retries (issue 7) are not in this binary: portico -t refuses "
                    "the orders upstream's \"retry\" key (%s)" % err.strip().splitlines()[0])
    f = start_fleet(tmp_path, portico_bin, config=path)
    try:
        port = f.ports["PORTICO_PORT"]
        users = [signup(port, "u%d" % i) for i in range(6)]
        results, stop = [], threading.Event()

        def client(hdrs):
            while not stop.is_set():
                try:
                    results.append(call(port, "GET", "/api/orders/", headers=hdrs).status)
                except (OSError, AssertionError) as e:
                    results.append(repr(e))
                time.sleep(0.9)   # under the per-user rate (60/m)
        threads = [threading.Thread(target=client, args=(u,)) for u in users]
        for t in threads:
            t.start()
        time.sleep(2)
        os.killpg(f.pid("orders-2"), signal.SIGKILL)
        time.sleep(5)
        stop.set()
        for t in threads:
            t.join(20)
        assert len(results) >= 30, results
        assert set(results) == {200}, results
    finally:
        rc, left = f.stop()
    assert set(left) <= {"orders-2"}, left
