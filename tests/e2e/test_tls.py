"""TLS at the edge and to upstreams, with certificates made by this suite
(openssl CLI): SNI selection, RSA/ECDSA choice, minimum version, ALPN,
resumption across workers, mutual TLS, plain HTTP on a TLS port, handshake
timeout, redirect to https, upstream TLS verification, and portico -t."""
import hashlib
import json
import os
import socket
import ssl
import subprocess
import time

import pytest

import util
from conftest import free_port, make_config

OPENSSL = "openssl"


def run(*args, cwd=None, input=None, timeout=20):
    return subprocess.run(list(args), cwd=cwd, input=input, capture_output=True, timeout=timeout)


# -- certificates ------------------------------------------------------------

CA_CNF = """[ca]
default_ca = d
[d]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = p
copy_extensions = copy
unique_subject = no
[p]
commonName = supplied
"""


class Certs:
    """certs.alpha_rsa_crt -> <dir>/alpha-rsa.crt"""

    def __init__(self, d):
        self.d = d

    def __getattr__(self, name):
        base, ext = name.rsplit("_", 1)
        return str(self.d / ("%s.%s" % (base.replace("_", "-"), ext)))


def _key(d, name, kind):
    if kind == "rsa":
        args = ["-newkey", "rsa:2048"]
    else:
        args = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    return args + ["-nodes", "-keyout", str(d / (name + ".key"))]


def _signed(d, name, cn, san, kind="rsa", ca="ca", eku=None, dates=None):
    """A certificate for cn/san signed by ca (dates: openssl ca start/end)."""
    exts = ["-addext", "subjectAltName=" + san] if san else []
    if eku:
        exts += ["-addext", "extendedKeyUsage=" + eku]
    r = run(OPENSSL, "req", "-new", *_key(d, name, kind), "-subj", "/CN=" + cn, *exts,
            "-out", str(d / (name + ".csr")))
    assert r.returncode == 0, r.stderr
    if dates:
        r = run(OPENSSL, "ca", "-batch", "-config", "ca.cnf", "-cert", ca + ".crt", "-keyfile",
                ca + ".key", "-startdate", dates[0], "-enddate", dates[1], "-in", name + ".csr",
                "-out", name + ".crt", cwd=d)
    else:
        r = run(OPENSSL, "x509", "-req", "-in", name + ".csr", "-CA", ca + ".crt", "-CAkey",
                ca + ".key", "-CAcreateserial", "-days", "2", "-copy_extensions", "copy",
                "-out", name + ".crt", cwd=d)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    (d / "ca.cnf").write_text(CA_CNF)
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    for ca in ("ca", "rogue"):
        r = run(OPENSSL, "req", "-x509", *_key(d, ca, "ec"), "-days", "2", "-subj",
                "/CN=Test " + ca, "-out", str(d / (ca + ".crt")))
        assert r.returncode == 0, r.stderr
    # alpha: RSA and ECDSA for the same names (one with a wildcard)
    _signed(d, "alpha-rsa", "alpha.test", "DNS:alpha.test,DNS:*.wild.test", "rsa")
    _signed(d, "alpha-ec", "alpha.test", "DNS:alpha.test,DNS:*.wild.test", "ec")
    _signed(d, "beta", "beta.test", "DNS:beta.test", "ec")
    _signed(d, "upstream", "upstream.test", "DNS:upstream.test,IP:127.0.0.1", "ec")
    _signed(d, "client", "client-1", None, "ec", eku="clientAuth")
    _signed(d, "rogue-client", "client-1", None, "ec", ca="rogue", eku="clientAuth")
    _signed(d, "expired", "old.test", "DNS:old.test", "ec",
            dates=("20200101000000Z", "20200201000000Z"))
    # a chain file: the leaf then the CA
    (d / "beta-chain.crt").write_text((d / "beta.crt").read_text() + (d / "ca.crt").read_text())
    return Certs(d)


def tls_listener(port, certs, names=("alpha-rsa", "alpha-ec", "beta"), **opts):
    tls = {"certificates": [{"cert": getattr(certs, n.replace("-", "_") + "_crt"),
                             "key": getattr(certs, n.replace("-chain", "").replace("-", "_") + "_key")}
                            for n in names]}
    tls.update(opts)
    return {"address": "127.0.0.1:%d" % port, "tls": tls}


@pytest.fixture
def tls_gw(portico, upstream, certs):
    """tls_gw(listener_opts..., names=..., workers=1, upstream_opts=None) -> (portico, port, echo)."""

    def start(names=("alpha-rsa", "alpha-ec", "beta"), workers=1, upstream_opts=None,
              echo_args=(), extra_listeners=(), routes=None, **opts):
        e = upstream("echo.py", *echo_args)
        port = free_port()
        cfg = make_config(port=port, routes=routes or [{"path": "/", "upstream": "echo"}],
                          upstreams={"echo": dict({"endpoints": [e.addr]}, **(upstream_opts or {}))},
                          workers=workers)
        cfg["listeners"] = [tls_listener(port, certs, names, **opts)] + list(extra_listeners)
        p = portico(cfg, port=port)
        return p, port, e

    return start


def client_ctx(certs, ca="ca", alpn=("http/1.1",), **kw):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(getattr(certs, ca + "_crt"))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def tls_connect(port, ctx, server_name="alpha.test", session=None, timeout=5):
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_name, session=session)
    except Exception:
        raw.close()
        raise


def https_get(s, target="/", host="alpha.test", headers=()):
    """One request on an open TLS socket; returns (status, headers, body)."""
    req = "GET %s HTTP/1.1\r\nHost: %s\r\n" % (target, host)
    for k, v in headers:
        req += "%s: %s\r\n" % (k, v)
    s.sendall((req + "\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError("closed before the head: %r" % data)
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        k, v = line.split(":", 1)
        hdrs[k.strip().lower()] = v.strip()
    n = int(hdrs.get("content-length", "0"))
    while len(body) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, hdrs, body


def echoed(body):
    doc = json.loads(body)
    out = {}
    for k, v in doc["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return doc, out


def s_client(port, *args, input=b""):
    r = run(OPENSSL, "s_client", "-connect", "127.0.0.1:%d" % port, *args, input=input,
            timeout=10)
    return r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")


def served_cert(port, *args):
    """Subject, SANs and key type of the certificate the server sends."""
    out = s_client(port, *args)
    if "BEGIN CERTIFICATE" not in out:
        return None
    pem = out[out.index("-----BEGIN CERTIFICATE-----"):out.index("-----END CERTIFICATE-----") + 25]
    r = run(OPENSSL, "x509", "-noout", "-subject", "-ext", "subjectAltName", "-text",
            input=pem.encode())
    return r.stdout.decode()


# -- certificate selection ------------------------------------------------------

def test_sni_selects_certificate(tls_gw):
    _, port, _ = tls_gw()
    assert "CN = beta.test" in served_cert(port, "-servername", "beta.test")
    assert "CN = alpha.test" in served_cert(port, "-servername", "alpha.test")
    # wildcard: one label only
    assert "CN = alpha.test" in served_cert(port, "-servername", "x.wild.test")
    # names are compared case-insensitively
    assert "CN = beta.test" in served_cert(port, "-servername", "BETA.test")


def test_default_certificate_is_the_first(tls_gw):
    _, port, _ = tls_gw(names=("beta", "alpha-rsa"))
    assert "CN = beta.test" in served_cert(port, "-noservername")
    assert "CN = beta.test" in served_cert(port, "-servername", "unknown.test")
    assert "CN = beta.test" in served_cert(port, "-servername", "a.b.wild.test")
    assert "CN = alpha.test" in served_cert(port, "-servername", "alpha.test")


def test_rsa_and_ecdsa_chosen_by_the_client(tls_gw):
    _, port, _ = tls_gw()
    ec = served_cert(port, "-servername", "alpha.test", "-tls1_2", "-cipher",
                     "ECDHE-ECDSA-AES128-GCM-SHA256")
    rsa = served_cert(port, "-servername", "alpha.test", "-tls1_2", "-cipher",
                      "ECDHE-RSA-AES128-GCM-SHA256")
    assert "id-ecPublicKey" in ec and "CN = alpha.test" in ec
    assert "rsaEncryption" in rsa and "CN = alpha.test" in rsa
    tls13_rsa = served_cert(port, "-servername", "alpha.test", "-tls1_3", "-sigalgs",
                            "rsa_pss_rsae_sha256")
    assert "rsaEncryption" in tls13_rsa


def test_chain_is_sent(tls_gw, certs):
    _, port, _ = tls_gw(names=("beta-chain",))
    out = s_client(port, "-servername", "beta.test", "-showcerts")
    assert out.count("BEGIN CERTIFICATE") == 2


# -- proxying over TLS ------------------------------------------------------------

def test_proxied_with_forwarded_proto_and_access_log(tls_gw, certs):
    p, port, _ = tls_gw()
    with tls_connect(port, client_ctx(certs)) as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        st, _, body = https_get(s, "/hello", headers=[("X-Forwarded-Proto", "http")])
        assert st == 200
        doc, h = echoed(body)
        assert doc["target"] == "/hello"
        assert h["x-forwarded-proto"] == ["https"]
        # keep-alive over TLS
        st, _, body = https_get(s, "/again")
        assert st == 200 and json.loads(body)["target"] == "/again"
        version = s.version()
        cipher = s.cipher()[0]

    def logged():
        lines = [json.loads(x) for x in p.stdout().splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("path") == "/again"]
    assert util.wait_until(logged, 3), p.stdout()
    e = logged()[0]
    assert e["tls_version"] == version
    assert e["tls_cipher"] == cipher


def test_plain_listener_logs_no_tls_fields(gateway):
    g = gateway()
    assert g.get("/plain").status == 200
    assert util.wait_until(lambda: "/plain" in g.portico.stdout(), 3)
    line = [x for x in g.portico.stdout().splitlines() if "/plain" in x][0]
    assert "tls_version" not in line
    assert g.get("/p2").echoed_headers()["x-forwarded-proto"] == ["http"]


def test_large_bodies_both_ways(tls_gw, certs):
    _, port, _ = tls_gw()
    with tls_connect(port, client_ctx(certs)) as s:
        s.sendall(b"GET /big/3000000 HTTP/1.1\r\nHost: alpha.test\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        assert b" 200 " in head.split(b"\r\n")[0]
        while len(body) < 3000000:
            chunk = s.recv(1 << 20)
            assert chunk
            body += chunk
        assert body == (bytes(range(256)) * 11720)[:3000000]
        payload = os.urandom(2500000)
        s.sendall(b"POST /sink HTTP/1.1\r\nHost: alpha.test\r\nContent-Length: %d\r\n\r\n"
                  % len(payload) + payload)
        data = b""
        while not data.endswith(b"}"):
            data += s.recv(65536)
        out = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert out["length"] == len(payload)
        assert out["sha256"] == hashlib.sha256(payload).hexdigest()


def test_alpn_prefers_h2_then_http11(tls_gw, certs):
    _, port, _ = tls_gw()
    with tls_connect(port, client_ctx(certs, alpn=("h2",))) as s:
        assert s.selected_alpn_protocol() == "h2"
    with tls_connect(port, client_ctx(certs, alpn=("http/1.1", "h2"))) as s:
        assert s.selected_alpn_protocol() == "h2"  # our preference wins
    with tls_connect(port, client_ctx(certs, alpn=("http/1.1",))) as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        assert https_get(s)[0] == 200
    with tls_connect(port, client_ctx(certs, alpn=None)) as s:
        assert s.selected_alpn_protocol() is None
        assert https_get(s)[0] == 200


def test_alpn_http11_only_refuses_h2_only_clients(tls_gw, certs):
    _, port, _ = tls_gw(alpn=["http/1.1"])
    with pytest.raises(ssl.SSLError):
        tls_connect(port, client_ctx(certs, alpn=("h2",)))
    with tls_connect(port, client_ctx(certs, alpn=("h2", "http/1.1"))) as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        assert https_get(s)[0] == 200


# -- versions ---------------------------------------------------------------------

def test_tls11_refused_by_default(tls_gw):
    _, port, _ = tls_gw()
    out = s_client(port, "-servername", "alpha.test", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert "BEGIN CERTIFICATE" not in out
    out = s_client(port, "-servername", "alpha.test", "-tls1_2")
    assert "BEGIN CERTIFICATE" in out and "TLSv1.2" in out


def test_tls11_allowed_when_asked(tls_gw):
    _, port, _ = tls_gw(min_version="TLSv1.1")
    out = s_client(port, "-servername", "alpha.test", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert "BEGIN CERTIFICATE" in out and "TLSv1.1" in out


def test_min_tls13(tls_gw, certs):
    _, port, _ = tls_gw(min_version="TLSv1.3")
    with pytest.raises(ssl.SSLError):
        tls_connect(port, client_ctx(certs, maximum_version=ssl.TLSVersion.TLSv1_2))
    with tls_connect(port, client_ctx(certs)) as s:
        assert s.version() == "TLSv1.3"


def test_ciphers_configured(tls_gw, certs):
    _, port, _ = tls_gw(ciphers="ECDHE-ECDSA-CHACHA20-POLY1305",
                        ciphersuites="TLS_CHACHA20_POLY1305_SHA256")
    ctx = client_ctx(certs, maximum_version=ssl.TLSVersion.TLSv1_2)
    with tls_connect(port, ctx) as s:
        assert s.cipher()[0] == "ECDHE-ECDSA-CHACHA20-POLY1305"
    with tls_connect(port, client_ctx(certs)) as s:
        assert s.cipher()[0] == "TLS_CHACHA20_POLY1305_SHA256"


# -- plain HTTP and stalls ----------------------------------------------------------

def test_plain_http_on_tls_port(tls_gw):
    p, port, _ = tls_gw()
    data = util.recv_all(port, b"GET / HTTP/1.1\r\nHost: alpha.test\r\n\r\n", timeout=3)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"plain HTTP request was sent to HTTPS port" in data
    # other garbage is just closed
    data = util.recv_all(port, b"\x00\x01garbage\r\n\r\n", timeout=3)
    assert b"200" not in data
    assert p.poll() is None


def test_handshake_stall_times_out(tls_gw, certs):
    _, port, _ = tls_gw(handshake_timeout_ms=300)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"\x16\x03\x01\x02\x00")  # a record header, then nothing
    s.settimeout(3)
    t0 = time.monotonic()
    assert s.recv(100) == b""
    assert 0.2 < time.monotonic() - t0 < 2.0
    s.close()
    # a silent client too
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(3)
    assert s.recv(100) == b""
    s.close()
    # and a normal client is unaffected
    with tls_connect(port, client_ctx(certs)) as c:
        assert https_get(c)[0] == 200


# -- resumption ---------------------------------------------------------------------

@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_resumption_across_workers(tls_gw, certs, version):
    _, port, _ = tls_gw(workers=2)
    ctx = client_ctx(certs, maximum_version=version)
    with tls_connect(port, ctx) as s:
        assert https_get(s)[0] == 200  # TLS 1.3 tickets arrive after the handshake
        sess = s.session
        assert not s.session_reused
    reused = 0
    for _ in range(16):
        with tls_connect(port, ctx, session=sess) as s:
            assert https_get(s)[0] == 200
            reused += s.session_reused
            if version == ssl.TLSVersion.TLSv1_3:
                sess = s.session
    # SO_REUSEPORT spreads these over both workers: all resumed means the
    # workers share the ticket keys.
    assert reused == 16


def test_resumption_with_openssl_cli(tls_gw, tmp_path):
    _, port, _ = tls_gw(workers=2)
    sess = str(tmp_path / "sess.pem")
    # a whole exchange, so that the TLS 1.3 ticket (sent after the
    # handshake) is read before s_client saves the session
    req = b"GET / HTTP/1.1\r\nHost: alpha.test\r\nConnection: close\r\n\r\n"
    out = s_client(port, "-servername", "alpha.test", "-ign_eof", "-sess_out", sess, input=req)
    assert "New," in out and "HTTP/1.1 200" in out
    for _ in range(6):
        out = s_client(port, "-servername", "alpha.test", "-ign_eof", "-sess_in", sess, input=req)
        assert "Reused," in out, out


def test_resumption_chained_each_resumed_handshake_gets_a_new_ticket(tls_gw, tmp_path):
    """OpenSSL's TLS 1.3 client (wrk, curl, Python) and browsers use a ticket
    once and resume with the newest one; without a new ticket after each
    resumption, every other connection was a full handshake."""
    _, port, _ = tls_gw(workers=2)
    req = b"GET / HTTP/1.1\r\nHost: alpha.test\r\nConnection: close\r\n\r\n"
    prev = str(tmp_path / "sess0.pem")
    out = s_client(port, "-servername", "alpha.test", "-ign_eof", "-tls1_3", "-sess_out", prev,
                   input=req)
    assert "New, TLSv1.3" in out and "HTTP/1.1 200" in out, out
    for i in range(1, 7):
        nxt = str(tmp_path / ("sess%d.pem" % i))
        out = s_client(port, "-servername", "alpha.test", "-ign_eof", "-tls1_3", "-msg",
                       "-sess_in", prev, "-sess_out", nxt, input=req)
        assert "Reused, TLSv1.3" in out, "connection %d was not resumed:\n%s" % (i, out)
        assert "NewSessionTicket" in out, "no new ticket after resumption %d" % i
        prev = nxt


def test_resumption_by_session_id_across_workers(tls_gw, certs):
    """Without tickets, TLS 1.2 clients resume from the server's session
    cache, which the workers share."""
    _, port, _ = tls_gw(workers=2, session_tickets=False)
    ctx = client_ctx(certs, maximum_version=ssl.TLSVersion.TLSv1_2)
    with tls_connect(port, ctx) as s:
        https_get(s)
        sess = s.session
        assert not sess.has_ticket
    reused = 0
    for _ in range(12):
        with tls_connect(port, ctx, session=sess) as s:
            https_get(s)
            reused += s.session_reused
    assert reused == 12


def test_resumption_off(tls_gw, certs):
    _, port, _ = tls_gw(session_tickets=False, session_cache=0)
    ctx = client_ctx(certs)
    with tls_connect(port, ctx) as s:
        https_get(s)
        sess = s.session
    with tls_connect(port, ctx, session=sess) as s:
        https_get(s)
        assert not s.session_reused


# -- mutual TLS -----------------------------------------------------------------------

CERT_HEADERS = {"subject": "X-Client-Subject", "fingerprint": "X-Client-Cert-Sha256"}


def _fingerprint(pem_path):
    r = run(OPENSSL, "x509", "-in", pem_path, "-outform", "DER")
    return hashlib.sha256(r.stdout).hexdigest()


def test_mtls_required(tls_gw, certs):
    _, port, _ = tls_gw(client_ca=certs.ca_crt, verify="required", client_cert_headers=CERT_HEADERS)
    ctx = client_ctx(certs)
    ctx.load_cert_chain(certs.client_crt, certs.client_key)
    with tls_connect(port, ctx) as s:
        st, _, body = https_get(s, headers=[("X-Client-Subject", "CN=admin"),
                                            ("x-client-cert-sha256", "00")])
        assert st == 200
        _, h = echoed(body)
        assert h["x-client-subject"] == ["CN=client-1"]
        assert h["x-client-cert-sha256"] == [_fingerprint(certs.client_crt)]
    # no certificate: refused (TLS 1.3 reports it at the first read)
    with pytest.raises((ssl.SSLError, EOFError, ConnectionResetError)):
        with tls_connect(port, client_ctx(certs)) as s:
            https_get(s)
    # a certificate from another CA: refused
    bad = client_ctx(certs)
    bad.load_cert_chain(certs.rogue_client_crt, certs.rogue_client_key)
    with pytest.raises((ssl.SSLError, EOFError, ConnectionResetError)):
        with tls_connect(port, bad) as s:
            https_get(s)


def test_mtls_optional(tls_gw, certs):
    _, port, _ = tls_gw(client_ca=certs.ca_crt, verify="optional", client_cert_headers=CERT_HEADERS)
    with tls_connect(port, client_ctx(certs)) as s:
        st, _, body = https_get(s, headers=[("X-Client-Subject", "CN=admin")])
        assert st == 200
        _, h = echoed(body)
        assert "x-client-subject" not in h and "x-client-cert-sha256" not in h
    bad = client_ctx(certs)
    bad.load_cert_chain(certs.rogue_client_crt, certs.rogue_client_key)
    with tls_connect(port, bad) as s:
        st, _, body = https_get(s, headers=[("X-Client-Subject", "CN=admin")])
        assert st == 200
        _, h = echoed(body)
        assert "x-client-subject" not in h  # not verified: not passed on
    good = client_ctx(certs)
    good.load_cert_chain(certs.client_crt, certs.client_key)
    with tls_connect(port, good) as s:
        st, _, body = https_get(s)
        _, h = echoed(body)
        assert h["x-client-subject"] == ["CN=client-1"]


# -- redirect -------------------------------------------------------------------------

def test_redirect_to_https(portico):
    port = free_port()
    cfg = make_config(port=port, routes=[{"path": "/", "respond": {"status": 200, "body": "x"}}])
    cfg["listeners"][0]["redirect_to_https"] = {"port": 8443}
    port2 = free_port()
    cfg["listeners"].append({"address": "127.0.0.1:%d" % port2, "redirect_to_https": True})
    portico(cfg)
    r = util.get(port, "/a/b?x=1&y=2", host="Shop.Example:8080")
    assert r.status == 301
    assert r.header("location") == "https://shop.example:8443/a/b?x=1&y=2"
    r = util.request(port, "POST", "/form", host="shop.example", body=b"abc")
    assert r.status == 308
    assert r.header("location") == "https://shop.example:8443/form"
    r = util.get(port2, "/p", host="shop.example:8080")
    assert r.status == 301 and r.header("location") == "https://shop.example/p"
    r = util.request(port2, "HEAD", "/h", host="[::1]:80")
    assert r.status == 301 and r.header("location") == "https://[::1]/h"


# -- upstream TLS --------------------------------------------------------------------------

def test_upstream_tls_verified_and_pooled(gateway, certs):
    g = gateway(upstream_opts={"tls": {"ca": certs.ca_crt}},
                echo_args=("--tls-cert", certs.upstream_crt, "--tls-key", certs.upstream_key))
    with g.conn() as c:
        c.request("GET", "/one")
        r1 = c.read_response()
        c.request("GET", "/two")
        r2 = c.read_response()
    assert r1.status == 200 and r2.status == 200
    d1, d2 = r1.json(), r2.json()
    assert d2["conn_id"] == d1["conn_id"] and d2["conn_requests"] == 2  # reused TLS connection
    big = g.get("/big/1000000")
    assert big.status == 200 and len(big.body) == 1000000
    payload = os.urandom(700000)
    r = g.request("POST", "/sink", body=payload)
    assert r.json()["sha256"] == hashlib.sha256(payload).hexdigest()


def test_upstream_tls_sessions_resumed(gateway, certs):
    g = gateway(upstream_opts={"tls": {"ca": certs.ca_crt}, "keepalive": 0},
                echo_args=("--tls-cert", certs.upstream_crt, "--tls-key", certs.upstream_key))
    ids = set()
    for i in range(5):
        r = g.get("/n%d" % i)
        assert r.status == 200
        ids.add(r.json()["conn_id"])
    assert len(ids) == 5  # a new connection each time (no pooling)...
    with tls_connect(g.echo.port, client_ctx(certs), server_name="upstream.test") as s:
        st, _, body = https_get(s, "/__stats", host="stats")
    assert json.loads(body)["tls_session_hits"] >= 4  # ...but resumed handshakes


def test_upstream_tls_sni_name(gateway, certs):
    g = gateway(upstream_opts={"tls": {"ca": certs.ca_crt, "sni": "upstream.test"}},
                echo_args=("--tls-cert", certs.upstream_crt, "--tls-key", certs.upstream_key))
    assert g.get("/x").status == 200


def test_upstream_tls_verification_failures(gateway, certs):
    args = ("--tls-cert", certs.upstream_crt, "--tls-key", certs.upstream_key)
    g = gateway(upstream_opts={"tls": {"ca": certs.rogue_crt}}, echo_args=args)
    assert g.get("/x").status == 502
    assert util.wait_until(lambda: "certificate verify failed" in g.portico.stderr(), 3), \
        g.portico.stderr()
    g2 = gateway(upstream_opts={"tls": {"ca": certs.ca_crt, "sni": "other.test"}}, echo_args=args)
    assert g2.get("/x").status == 502
    assert util.wait_until(lambda: "hostname mismatch" in g2.portico.stderr(), 3), \
        g2.portico.stderr()
    # the system bundle does not know our CA
    g3 = gateway(upstream_opts={"tls": True}, echo_args=args)
    assert g3.get("/x").status == 502
    g4 = gateway(upstream_opts={"tls": {"verify": False}}, echo_args=args)
    assert g4.get("/x").status == 200


def test_upstream_mtls_client_certificate(gateway, certs):
    args = ("--tls-cert", certs.upstream_crt, "--tls-key", certs.upstream_key,
            "--tls-client-ca", certs.ca_crt)
    g = gateway(upstream_opts={"tls": {"ca": certs.ca_crt, "cert": certs.client_crt,
                                       "key": certs.client_key}}, echo_args=args)
    r = g.get("/m")
    assert r.status == 200
    assert r.json()["client_subject"] == {"commonName": "client-1"}
    # without a client certificate the upstream refuses the handshake
    g2 = gateway(upstream_opts={"tls": {"ca": certs.ca_crt}}, echo_args=args)
    assert g2.get("/m").status == 502


def test_upstream_tls_to_plain_server(gateway, certs):
    g = gateway(upstream_opts={"tls": {"ca": certs.ca_crt}})
    assert g.get("/x").status == 502


# -- portico -t -------------------------------------------------------------------------

def check_config(portico_bin, tmp_path, listener_tls=None, upstream_tls=None):
    port = free_port()
    cfg = make_config(port=port, routes=[{"path": "/", "respond": {"status": 200}}])
    if listener_tls is not None:
        cfg["listeners"][0]["tls"] = listener_tls
    if upstream_tls is not None:
        cfg["upstreams"] = {"u": {"endpoints": ["127.0.0.1:1"], "tls": upstream_tls}}
        cfg["routes"] = [{"path": "/", "upstream": "u"}]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(cfg))
    r = run(portico_bin, "-t", "-c", str(path))
    return r.returncode, r.stdout.decode() + r.stderr.decode()


def test_config_check_errors(portico_bin, tmp_path, certs):
    rc, out = check_config(portico_bin, tmp_path, {"certificates": [
        {"cert": certs.alpha_rsa_crt, "key": certs.beta_key}]})
    assert rc == 1 and "listeners[0].tls.certificates[0].key: the key in" in out
    assert "does not match the certificate" in out
    assert "PRIVATE KEY" not in out
    rc, out = check_config(portico_bin, tmp_path, {"certificates": [
        {"cert": str(tmp_path / "missing.crt"), "key": certs.beta_key}]})
    assert rc == 1 and "certificates[0].cert: cannot open certificate" in out
    assert "No such file or directory" in out
    rc, out = check_config(portico_bin, tmp_path, {"certificates": [
        {"cert": certs.beta_key, "key": certs.beta_key}]})
    assert rc == 1 and "no PEM certificate in" in out
    rc, out = check_config(portico_bin, tmp_path, {"certificates": [
        {"cert": certs.beta_crt, "key": certs.beta_key}], "min_version": "TLSv1.4"})
    assert rc == 1 and "min_version: \"TLSv1.4\" is not one of" in out
    rc, out = check_config(portico_bin, tmp_path, {"certificates": [
        {"cert": certs.beta_crt, "key": certs.beta_key}], "ciphers": "NOT-A-CIPHER"})
    assert rc == 1 and "ciphers: no cipher" in out
    rc, out = check_config(portico_bin, tmp_path, {"certificates": [
        {"cert": certs.beta_crt, "key": certs.beta_key},
        {"cert": certs.beta_chain_crt, "key": certs.beta_key}]})
    assert rc == 1 and "certificates[1].cert: the same names and key type as certificates[0]" in out
    rc, out = check_config(portico_bin, tmp_path, upstream_tls={
        "ca": certs.ca_crt, "cert": certs.client_crt, "key": certs.beta_key})
    assert rc == 1 and "upstreams.u.tls.key: the key in" in out


def test_config_check_expired_is_a_warning(portico_bin, tmp_path, certs):
    rc, out = check_config(portico_bin, tmp_path, {"certificates": [
        {"cert": certs.expired_crt, "key": certs.expired_key}]})
    assert rc == 0, out
    assert "warning: listeners[0].tls.certificates[0]: the certificate in" in out
    assert "has expired" in out


def test_config_check_ok(portico_bin, tmp_path, certs):
    rc, out = check_config(portico_bin, tmp_path, {
        "certificates": [{"cert": certs.alpha_rsa_crt, "key": certs.alpha_rsa_key},
                         {"cert": certs.alpha_ec_crt, "key": certs.alpha_ec_key}],
        "min_version": "TLSv1.3", "client_ca": certs.ca_crt, "verify": "optional",
        "client_cert_headers": CERT_HEADERS, "session_cache": 1000, "ticket_rotation_s": 600},
        upstream_tls={"ca": certs.ca_crt, "sni": "upstream.test", "cert": certs.client_crt,
                      "key": certs.client_key})
    assert rc == 0, out
    assert "warning" not in out


def test_idle_connections_trimmed_then_reused(tls_gw, certs):
    """Idle keep-alive connections give their request memory back after a
    second (worker tick); the next request on them must work as before."""
    p, port, _ = tls_gw(extra_listeners=[{"address": "127.0.0.1:%d" % free_port()}])
    plain_port = int(p.config["listeners"][1]["address"].rsplit(":", 1)[1])
    with tls_connect(port, client_ctx(certs)) as s, util.Conn(plain_port) as c:
        assert https_get(s, "/a")[0] == 200
        c.request("GET", "/a")
        assert c.read_response().status == 200
        time.sleep(2.2)
        st, _, body = https_get(s, "/b", headers=[("X-Pad", "x" * 3000)])
        assert st == 200 and json.loads(body)["target"] == "/b"
        c.request("GET", "/b", headers={"X-Pad": "y" * 3000})
        r = c.read_response()
        assert r.status == 200 and r.json()["target"] == "/b"


def test_pipelined_requests_behind_a_paused_one(tls_gw, certs, portico_bin):
    """Pipelined requests that OpenSSL already decrypted (no socket edge
    will announce them) are served once a paused request is resumed."""
    if "example" not in run(portico_bin, "-V").stdout.decode():
        pytest.skip("the example module is not built in")
    pause = {"example": {"name": "p", "on_request": "pause", "pause_ms": 200}}
    _, port, _ = tls_gw(routes=[{"path": "/", "upstream": "echo", "filters": [pause]}])
    with tls_connect(port, client_ctx(certs)) as s:
        for i in range(3):  # one TLS record each
            s.sendall(b"GET /p%d HTTP/1.1\r\nHost: alpha.test\r\n\r\n" % i)
        s.settimeout(3)
        data = b""
        while data.count(b"HTTP/1.1 200") < 3 or not data.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    assert all(b'"target": "/p%d"' % i in data for i in range(3))


def test_shutdown_with_tls_connections_open(tls_gw, certs):
    p, port, _ = tls_gw()
    idle = tls_connect(port, client_ctx(certs))
    assert https_get(idle)[0] == 200
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"\x16\x03\x01\x02\x00")  # mid-handshake
    time.sleep(0.1)
    assert p.stop() == 0
    idle.settimeout(2)
    assert idle.recv(100) == b""  # close_notify, then EOF
    half.settimeout(2)
    assert half.recv(100) == b""
    idle.close()
    half.close()


def test_slow_reader_gets_every_byte(tls_gw, certs):
    """A client that reads slowly makes TLS writes stop half-way (a record
    written in part); they resume with the same bytes, and nothing is lost
    or repeated."""
    _, port, _ = tls_gw()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    raw.connect(("127.0.0.1", port))
    with client_ctx(certs).wrap_socket(raw, server_hostname="alpha.test") as s:
        n = 4000000
        s.sendall(b"GET /big/%d HTTP/1.1\r\nHost: alpha.test\r\n\r\n" % n)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        body = data.split(b"\r\n\r\n", 1)[1]
        reads = 0
        while len(body) < n:
            chunk = s.recv(32768)
            assert chunk
            body += chunk
            reads += 1
            if reads % 16 == 0:
                time.sleep(0.01)
        assert body == (bytes(range(256)) * (n // 256 + 1))[:n]
        # chunked, through the same connection
        s.sendall(b"GET /bigchunked/300000 HTTP/1.1\r\nHost: alpha.test\r\n\r\n")
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            assert chunk
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        assert b"chunked" in head.lower()
        out, pos = b"", 0
        while True:
            eol = rest.index(b"\r\n", pos)
            size = int(rest[pos:eol], 16)
            if size == 0:
                break
            out += rest[eol + 2:eol + 2 + size]
            pos = eol + 2 + size + 2
        assert out == (bytes(range(256)) * 1200)[:300000]


def test_upstream_tls_slow_reader(gateway, certs):
    """The upstream takes the body slowly: TLS writes to it stop half-way
    and resume; the upstream gets every byte."""
    g = gateway(upstream_opts={"tls": {"ca": certs.ca_crt}},
                echo_args=("--tls-cert", certs.upstream_crt, "--tls-key", certs.upstream_key))
    payload = os.urandom(3000000)
    r = util.request(g.port, "POST", "/slowsink", body=payload, timeout=20)
    assert r.status == 200
    assert r.json()["sha256"] == hashlib.sha256(payload).hexdigest()
    r = util.get(g.port, "/bigchunked/500000", timeout=10)
    assert r.status == 200 and r.body == (bytes(range(256)) * 2000)[:500000]


def test_certificates_reload_without_dropping_connections(tls_gw, certs):
    """SIGHUP with a new certificate list: new handshakes get it, a TLS
    connection opened before keeps working on its own session."""
    import json
    import signal
    import time
    p, port, _ = tls_gw(names=("alpha-rsa",))
    assert "CN = alpha.test" in served_cert(port, "-servername", "beta.test")  # the default
    ctx = client_ctx(certs)
    old = tls_connect(port, ctx)
    st, _, _ = https_get(old, "/before")
    assert st == 200
    cfg = json.loads(p.config_path.read_text())
    cfg["listeners"][0]["tls"]["certificates"] = [
        {"cert": certs.beta_crt, "key": certs.beta_key},
        {"cert": certs.alpha_rsa_crt, "key": certs.alpha_rsa_key}]
    p.config_path.write_text(json.dumps(cfg))
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "reloaded" not in p.stderr() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "reloaded" in p.stderr()
    assert "CN = beta.test" in served_cert(port, "-servername", "beta.test")
    assert "CN = beta.test" in served_cert(port)  # the new default: the first
    st, _, body = https_get(old, "/after")
    assert st == 200 and echoed(body)[0]["target"] == "/after"
    old.close()
    # a reload to a missing key file changes nothing
    cfg["listeners"][0]["tls"]["certificates"][0]["key"] = "/nonexistent/key.pem"
    p.config_path.write_text(json.dumps(cfg))
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "reload failed" not in p.stderr() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "reload failed" in p.stderr()
    assert "CN = beta.test" in served_cert(port, "-servername", "beta.test")


def test_handshake_metrics(portico, upstream, certs):
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    e = upstream("echo.py")
    port, aport = free_port(), free_port()
    cfg = make_config(port=port, routes=[{"path": "/", "upstream": "echo"}],
                      upstreams={"echo": {"endpoints": [e.addr]}},
                      admin={"address": "127.0.0.1:%d" % aport})
    cfg["listeners"] = [tls_listener(port, certs)]
    portico(cfg, port=port)
    ctx = client_ctx(certs, maximum_version=ssl.TLSVersion.TLSv1_2)
    with tls_connect(port, ctx) as s:
        assert https_get(s)[0] == 200
        sess = s.session
    with tls_connect(port, ctx, session=sess) as s:
        assert https_get(s)[0] == 200 and s.session_reused
    util.recv_all(port, b"GET / HTTP/1.1\r\nHost: alpha.test\r\n\r\n", timeout=3)
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % aport, timeout=3) as r:
        text = r.read().decode()
    got = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "portico_tls_handshakes":
            for smp in fam.samples:
                got[(smp.labels["side"], smp.labels["result"])] = smp.value
    assert got.get(("client", "full")) == 1, got
    assert got.get(("client", "resumed")) == 1, got
    assert got.get(("client", "plain_http")) == 1, got


def test_kept_body_read_after_the_head_over_tls(portico, upstream, certs):
    """A retryable request's body that arrives after its head is read into
    its copy through TLS too, then replayed on the live endpoint."""
    e = upstream("echo.py")
    dead = "127.0.0.1:%d" % free_port()
    port = free_port()
    cfg = make_config(port=port, routes=[{"path": "/", "upstream": "u"}],
                      upstreams={"u": {"endpoints": [dead, e.addr],
                                       "retry": {"attempts": 2, "on": ["connect_failure"],
                                                 "retry_non_idempotent": True}}})
    cfg["listeners"] = [tls_listener(port, certs, ("alpha-rsa",))]
    portico(cfg, port=port)
    body = bytes(range(256)) * 120
    for i in range(4):
        with tls_connect(port, client_ctx(certs)) as s:
            s.sendall(b"POST /sink HTTP/1.1\r\nHost: alpha.test\r\nConnection: close\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body[:1000])
            time.sleep(0.1)
            s.sendall(body[1000:])
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), (i, head)
        assert json.loads(rest) == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                                    "framing": "length"}
