"""Fixtures for the end-to-end tests: the real portico binary, real upstream
processes (servers/echo.py, servers/misbehave.py), free ports, configs
written to tmp_path, and portico's output attached to failing tests.

The binary: $PORTICO_BIN, else /work/main/build/src/portico, else
../../src/portico relative to this directory (an in-tree build), else
../../build/src/portico.
"""
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import util  # noqa: E402

PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
SERVERS = HERE / "servers"


def _find_binary():
    env = os.environ.get("PORTICO_BIN")
    if env:
        return Path(env), "PORTICO_BIN"
    for cand in (Path("/work/main/build/src/portico"),
                 HERE.parent.parent / "src" / "portico",
                 HERE.parent.parent / "build" / "src" / "portico"):
        if cand.is_file():
            return cand, str(cand)
    return None, "searched /work/main/build/src/portico and ../../src/portico"


@pytest.fixture(scope="session")
def portico_bin():
    path, how = _find_binary()
    if path is None or not (path.is_file() and os.access(path, os.X_OK)):
        pytest.exit("portico binary not found or not executable (%s: %s). Build it, or set "
                    "PORTICO_BIN=/path/to/portico." % (how, path), returncode=1)
    return str(path)


_handed_out = set()


def free_port():
    """A port nothing listens on, never one this test run handed out before:
    two calls before either port is bound must not get the same one."""
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_port(port, proc, timeout=5.0, what="process"):
    """Wait until something accepts on port; fail early if proc exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.005)
    return False


class Proc:
    """A child process with stdout/stderr captured to files."""

    def __init__(self, name, argv, tmp_path, env=None):
        self.name = name
        self.argv = argv
        # CI reads every daemon log afterwards (sanitizer reports): keep
        # them under PORTICO_E2E_LOGDIR when it is set.
        logdir = os.environ.get("PORTICO_E2E_LOGDIR")
        if logdir:
            tmp_path = Path(logdir) / tmp_path.name
            tmp_path.mkdir(parents=True, exist_ok=True)
        n = 0
        while (tmp_path / ("%s-%d.stderr" % (name, n))).exists():
            n += 1
        self.out_path = tmp_path / ("%s-%d.stdout" % (name, n))
        self.err_path = tmp_path / ("%s-%d.stderr" % (name, n))
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL, env=env)
        self.pid = self.proc.pid
        self.expect_exit = False   # a test that ends the process itself sets this

    def poll(self):
        return self.proc.poll()

    def stdout(self):
        self._out.flush()
        return self.out_path.read_text(errors="replace")

    def stderr(self):
        self._err.flush()
        return self.err_path.read_text(errors="replace")

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout):
        """Exit status, or None if still running after timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def finish(self):
        self._out.close()
        self._err.close()

    def logs(self, limit=20000):
        out = self.stdout()
        err = self.stderr()
        return "--- %s (pid %d) argv: %s\n--- stdout:\n%s\n--- stderr:\n%s" % (
            self.name, self.pid, " ".join(self.argv), out[-limit:], err[-limit:])


class Upstream(Proc):
    def __init__(self, script, tmp_path, args=()):
        self.port = free_port()
        super().__init__(Path(script).stem, [PYTHON, "-S", str(SERVERS / script),
                                             "--port", str(self.port)] + list(args), tmp_path)
        if not wait_port(self.port, self.proc, what=script):
            raise RuntimeError("upstream %s did not start\n%s" % (script, self.logs()))

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    def stats(self):
        """The upstream's own /__stats (connections, requests, events)."""
        return util.get(self.port, "/__stats", host="stats").json()


class Portico(Proc):
    def __init__(self, binary, config, tmp_path, args=None, env=None, wait=True, port=None):
        self.config = config
        n = 0
        while (tmp_path / ("portico-%d.json" % n)).exists():
            n += 1
        self.config_path = tmp_path / ("portico-%d.json" % n)
        if isinstance(config, str):
            self.config_path.write_text(config)
        else:
            self.config_path.write_text(json.dumps(config, indent=2))
        argv = [binary, "-c", str(self.config_path)] + list(args or [])
        full_env = dict(os.environ)
        full_env.update(env or {})
        super().__init__("portico", argv, tmp_path, env=full_env)
        self.port = port
        if port is None and not isinstance(config, str) and config.get("listeners"):
            self.port = int(config["listeners"][0]["address"].rsplit(":", 1)[1])
        if wait and self.port:
            if not wait_port(self.port, self.proc):
                rc = self.proc.poll()
                raise AssertionError("portico did not start listening on %d (exit status %s)\n%s"
                                     % (self.port, rc, self.logs()))

    def rss_kb(self):
        return util.proc_status_kb(self.pid, "VmRSS")

    def hwm_kb(self):
        return util.proc_status_kb(self.pid, "VmHWM")

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        """Send sig and wait; returns the exit status (None if still running)."""
        self.expect_exit = True
        self.signal(sig)
        return self.wait(timeout)


def deep_merge(base, extra):
    out = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def make_config(port=None, routes=None, upstreams=None, **top):
    """A config dict: one listener on 127.0.0.1:port, one worker, access log
    to stdout, a short drain so teardown is quick. top-level keys in top are
    merged in (dicts merged key by key, e.g. limits={...})."""
    port = port or free_port()
    cfg = {
        "workers": 1,
        "log_level": "info",
        "listeners": [{"address": "127.0.0.1:%d" % port}],
        "limits": {"drain_timeout_ms": 1000},
        "access_log": {"path": "-", "format": "json"},
        "upstreams": upstreams or {},
        "routes": routes if routes is not None else [],
    }
    return deep_merge(cfg, top)


def _register(request, proc):
    procs = getattr(request.node, "_e2e_procs", None)
    if procs is None:
        procs = request.node._e2e_procs = []
    procs.append(proc)


@pytest.fixture
def upstream(request, tmp_path):
    """upstream("echo.py", *args) or upstream("misbehave.py", "--mode", M)."""
    started = []

    def start(script="echo.py", *args):
        u = Upstream(script, tmp_path, args)
        started.append(u)
        _register(request, u)
        return u

    yield start
    for u in started:
        u.kill()
        u.finish()


@pytest.fixture
def echo(upstream):
    return upstream("echo.py")


@pytest.fixture
def portico(request, tmp_path, portico_bin):
    """portico(config_dict_or_text, args=None, env=None, wait=True, port=None) -> Portico.

    port: where to wait for it to listen (default: the first listener of a
    config dict).

    At teardown, a portico that exited on its own during the test (a crash)
    or that ignores SIGTERM for 5 s fails the test."""
    started = []

    def start(config, args=None, env=None, wait=True, port=None):
        p = Portico(portico_bin, config, tmp_path, args=args, env=env, wait=wait, port=port)
        started.append(p)
        _register(request, p)
        return p

    yield start
    problems = []
    for p in started:
        rc = p.poll()
        if rc is None:
            p.signal(signal.SIGTERM)
            rc = p.wait(5.0)
            if rc is None:
                p.kill()
                problems.append("portico pid %d did not exit within 5 s of SIGTERM" % p.pid)
        elif not p.expect_exit:
            problems.append("portico pid %d exited during the test with status %d%s" % (
                p.pid, rc, " (signal %d)" % -rc if rc < 0 else ""))
        p.finish()
    if problems:
        pytest.fail("\n".join(problems) + "\n" + "\n".join(p.logs() for p in started),
                    pytrace=False)


class Gateway:
    """A running portico in front of an echo upstream."""

    def __init__(self, portico_proc, echo_up):
        self.portico = portico_proc
        self.echo = echo_up
        self.port = portico_proc.port

    def get(self, target, **kw):
        return util.get(self.port, target, **kw)

    def request(self, method, target, **kw):
        return util.request(self.port, method, target, **kw)

    def conn(self, **kw):
        return util.Conn(self.port, **kw)


@pytest.fixture
def gateway(portico, upstream):
    """gateway(routes=None, upstream_opts=None, echo_args=(), **top) -> Gateway.

    Starts an echo upstream named "echo" and portico with the given routes
    (default: "/" -> echo). upstream_opts are merged into the echo upstream's
    config; top-level keys go to make_config."""

    def start(routes=None, upstream_opts=None, echo_args=(), upstreams=None, **top):
        e = upstream("echo.py", *echo_args)
        ups = {"echo": dict({"endpoints": [e.addr]}, **(upstream_opts or {}))}
        ups.update(upstreams or {})
        if routes is None:
            routes = [{"path": "/", "upstream": "echo"}]
        cfg = make_config(routes=routes, upstreams=ups, **top)
        return Gateway(portico(cfg), e)

    return start


@pytest.fixture
def gw(gateway):
    """The plain gateway: "/" -> echo, defaults otherwise."""
    return gateway()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("call", "setup"):
        for p in getattr(item, "_e2e_procs", []):
            try:
                rep.sections.append(("%s pid %d stderr" % (p.name, p.pid), p.stderr()[-20000:]))
                if p.name == "portico":
                    rep.sections.append(("portico pid %d stdout" % p.pid, p.stdout()[-8000:]))
            except OSError:
                pass
