"""Binary upgrade (SIGUSR2): a new process takes over the listening
sockets; the old one drains on SIGTERM; clients see no error."""
import os
import re
import shutil
import signal
import threading
import time
import urllib.request

import util
from conftest import Portico, free_port, make_config


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    return None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def reap(pid, timeout=5.0):
    """Stop a process that is not our child: SIGTERM, then wait it out."""
    if not pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    if not wait_for(lambda: not pid_alive(pid), timeout):
        os.kill(pid, signal.SIGKILL)


def test_upgrade_under_load_drops_nothing(upstream, tmp_path, portico_bin):
    # Run a copy of the binary: the upgrade execs the path it started from.
    exe = tmp_path / "portico"
    shutil.copy(portico_bin, exe)
    e = upstream("echo.py")
    aport = free_port()
    cfg = make_config(upstreams={"e": {"endpoints": [e.addr]}},
                      routes=[{"path": "/", "upstream": "e"}], workers=2,
                      admin={"address": "127.0.0.1:%d" % aport},
                      access_log={"path": "off"})
    p = Portico(str(exe), cfg, tmp_path)
    new_pid = None
    try:
        stop = threading.Event()
        errors, ok = [], [0]
        lock = threading.Lock()

        def client(keepalive):
            conn = None
            while not stop.is_set():
                try:
                    if keepalive:
                        if conn is None:
                            conn = util.Conn(p.port, timeout=5)
                        conn.request("GET", "/x")
                        r = conn.read_response()
                        if r.header("connection", "").lower() == "close":
                            conn.close()
                            conn = None
                    else:
                        r = util.get(p.port, "/x", timeout=5)
                    with lock:
                        if r.status == 200:
                            ok[0] += 1
                        else:
                            errors.append("status %d" % r.status)
                except Exception as ex:  # noqa: BLE001
                    with lock:
                        errors.append(("%.3f " % time.monotonic()) + ("keepalive " if keepalive else "fresh ") + repr(ex))
                    if conn is not None:
                        conn.close()
                        conn = None
            if conn is not None:
                conn.close()

        threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        t_usr2 = time.monotonic()
        p.signal(signal.SIGUSR2)
        m = wait_for(lambda: re.search(r"binary upgrade: started .* as pid (\d+)", p.stderr()))
        assert m, p.stderr()
        new_pid = int(m.group(1))
        assert wait_for(lambda: p.stderr().count(" started: 2 workers") >= 2), p.stderr()
        time.sleep(0.3)
        t_term = time.monotonic()
        rc = p.stop(signal.SIGTERM, timeout=10)
        t_exit = time.monotonic()
        assert rc == 0, p.stderr()
        time.sleep(0.5)  # the new process alone
        stop.set()
        for t in threads:
            t.join(10)
        assert errors == [], "%d errors: %s (usr2 %.3f term %.3f exit %.3f)" % (
            len(errors), errors[:5], t_usr2, t_term, t_exit)
        assert ok[0] > 50
        assert pid_alive(new_pid)
        assert util.get(p.port, "/x").status == 200
        with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % aport, timeout=3) as r:
            assert r.status == 200
        # a second upgrade from the new process works as well
        os.kill(new_pid, signal.SIGUSR2)
        pat = r"binary upgrade: started .* as pid (\d+)"
        m2 = wait_for(lambda: len(re.findall(pat, p.stderr())) >= 2 and re.findall(pat, p.stderr()))
        assert m2 and len(m2) >= 2, p.stderr()
        third = int(m2[-1])
        assert wait_for(lambda: p.stderr().count(" started: 2 workers") >= 3)
        reap(new_pid)
        new_pid = third
        assert util.get(p.port, "/x").status == 200
    finally:
        if new_pid:
            reap(new_pid)
        p.kill()
        p.finish()


def test_failed_upgrade_keeps_the_old_process(echo, tmp_path, portico_bin):
    exe = tmp_path / "portico"
    shutil.copy(portico_bin, exe)
    cfg = make_config(upstreams={"e": {"endpoints": [echo.addr]}},
                      routes=[{"path": "/", "upstream": "e"}])
    p = Portico(str(exe), cfg, tmp_path)
    try:
        # the new executable is broken: it must fail alone
        exe.unlink()
        exe.write_text("#!/bin/sh\nexit 3\n")
        exe.chmod(0o755)
        p.signal(signal.SIGUSR2)
        assert wait_for(lambda: "exited with status 3" in p.stderr()), p.stderr()
        assert util.get(p.port, "/x").status == 200
        assert p.poll() is None
    finally:
        p.stop()
        p.finish()
