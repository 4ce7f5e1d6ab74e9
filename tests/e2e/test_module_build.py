"""Build-time module selection: configure separate out-of-tree builds of this
source tree with modules left out (--disable-module-NAME, --enable-modules)
and with an out-of-tree module (--add-module=DIR), build only src/portico,
and check what the binaries say and do.

The source tree: $PORTICO_SRCDIR, else the repository holding this file. It
must have been autoreconf'ed (a configure script) and must not be configured
in tree (autotools then refuses out-of-tree builds). Takes about a minute."""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import util
from conftest import Portico, Upstream, make_config

SRCDIR = Path(os.environ.get("PORTICO_SRCDIR") or Path(__file__).resolve().parent.parent.parent)

HELLO_C = r'''/* An out-of-tree module for the build test: greets in a response header
 * whoever the X-Name request header names. */
#include <stdio.h>
#include <string.h>
#include "module.h"

static int hello_parse(json_t *json, const char *path, void *gcfg, void **cfg, char *err, size_t errlen)
{
    (void)gcfg;
    if (!json_is_object(json) || json_object_size(json) != 0) {
        snprintf(err, errlen, "%s: must be an empty object", path);
        return -1;
    }
    *cfg = NULL;
    return 0;
}

static enum filter_status hello_on_request(struct request *r, void *cfg, void **ctx)
{
    size_t len = 0;
    const char *name = request_header(r, "X-Name", &len); /* not NUL-terminated */
    if (!name) {
        name = "world";
        len = 5;
    }
    char *copy = request_alloc(r, len + 1);
    memcpy(copy, name, len);
    *ctx = copy;
    return FILTER_CONTINUE;
}

static enum filter_status hello_on_response(struct request *r, void *cfg, void **ctx)
{
    char v[128];
    snprintf(v, sizeof(v), "hello, %s", *ctx ? (const char *)*ctx : "nobody");
    response_set_header(r, "X-Hello", v);
    return FILTER_CONTINUE;
}

static void hello_on_log(struct request *r, void *cfg, void **ctx)
{
}

const struct module module_hello = {
    .name = "hello",
    .parse_config = hello_parse,
    .on_request = hello_on_request,
    .on_response = hello_on_response,
    .on_log = hello_on_log,
};
'''


@pytest.fixture(scope="module")
def srcdir():
    if not (SRCDIR / "configure").is_file():
        pytest.skip("no configure script in %s: run autoreconf -fi there first "
                    "(or set PORTICO_SRCDIR)" % SRCDIR)
    if (SRCDIR / "config.status").exists():
        pytest.skip("%s is configured in tree; out-of-tree builds need `make distclean` "
                    "there first" % SRCDIR)
    return SRCDIR


@pytest.fixture(scope="module")
def build(srcdir, tmp_path_factory):
    """build(name, *configure_args) -> path of the built src/portico."""
    root = tmp_path_factory.mktemp("module-build")
    cache = root / "config.cache"   # shared: the library checks run once

    def do(name, *args):
        bdir = root / name
        bdir.mkdir()
        for cmd in ([str(srcdir / "configure"), "-q", "--cache-file=%s" % cache] + list(args),
                    ["make", "-j2", "src/portico"]):
            p = subprocess.run(cmd, cwd=bdir, capture_output=True, timeout=300,
                               stdin=subprocess.DEVNULL)
            assert p.returncode == 0, "%s failed (exit %d) in %s:\n%s\n%s" % (
                " ".join(cmd), p.returncode, bdir, p.stdout.decode(errors="replace")[-3000:],
                p.stderr.decode(errors="replace")[-6000:])
        binary = bdir / "src" / "portico"
        assert binary.is_file()
        return str(binary)

    return do


def run(binary, *args):
    p = subprocess.run([binary] + list(args), capture_output=True, timeout=10,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")


def modules_listed(binary):
    rc, out = run(binary, "-V")
    assert rc == 0, out
    for ln in out.splitlines():
        if ln.lower().startswith("modules:"):
            return [w for w in re.split(r"[\s,]+", ln.split(":", 1)[1]) if w]
    raise AssertionError("no 'modules:' line in -V output:\n" + out)


def check_config(binary, tmp_path, filters, name):
    cfg = make_config(upstreams={"app": {"endpoints": ["127.0.0.1:9"]}},
                      routes=[{"path": "/", "upstream": "app", "filters": filters}])
    path = tmp_path / name
    path.write_text(json.dumps(cfg, indent=2))
    return run(binary, "-t", "-c", str(path))


def test_disable_module(build, tmp_path):
    binary = build("no-cors", "--disable-module-cors")
    listed = modules_listed(binary)
    assert "cors" not in listed, listed
    for m in ("request_id", "headers", "ip_access", "example"):
        assert m in listed, listed
    rc, out = check_config(binary, tmp_path,
                           [{"cors": {"origins": ["https://app.example.com"]}}], "cors.json")
    assert rc == 1, out
    assert any("cors" in ln and "not built in" in ln for ln in out.splitlines()), out
    rc, out = check_config(binary, tmp_path, [{"example": {"name": "a"}}], "example.json")
    assert rc == 0, out


def test_enable_list_and_add_module(build, tmp_path):
    moddir = tmp_path / "hello-module"
    moddir.mkdir()
    (moddir / "hello.c").write_text(HELLO_C)
    binary = build("hello", "--enable-modules=example,headers", "--add-module=%s" % moddir)
    listed = modules_listed(binary)
    for m in ("example", "headers", "hello"):
        assert m in listed, listed
    for m in ("cors", "request_id", "ip_access"):
        assert m not in listed, listed
    rc, out = check_config(binary, tmp_path, [{"request_id": {}}], "rid.json")
    assert rc == 1 and "not built in" in out, out
    rc, out = check_config(binary, tmp_path, [{"hello": {"x": 1}}], "bad-hello.json")
    assert rc == 1 and "must be an empty object" in out, out

    # The added module runs in the chain of the binary it was built into.
    echo = Upstream("echo.py", tmp_path)
    cfg = make_config(upstreams={"echo": {"endpoints": [echo.addr]}},
                      routes=[{"path": "/", "upstream": "echo",
                               "filters": [{"hello": {}}, {"example": {"name": "e"}}]}])
    p = None
    try:
        p = Portico(binary, cfg, tmp_path)
        r = util.get(p.port, "/hi", headers={"X-Name": "module test"})
        assert r.status == 200, r
        assert r.header("X-Hello") == "hello, module test", r
        assert r.header_all("X-Example-Trace") == ["e:response"]
        r = util.get(p.port, "/hi")
        assert r.header("X-Hello") == "hello, world", r
        assert p.poll() is None
    finally:
        if p is not None:
            rc = p.stop()
            if rc is None:
                p.kill()
            p.finish()
        echo.kill()
        echo.finish()
    assert rc == 0, "portico exited %s on SIGTERM\n%s" % (rc, p.logs())
