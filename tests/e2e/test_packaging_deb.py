"""packaging/debian checked without building or installing it (CI's deb
step does that, as root): the systemd unit's commands and sandbox, with
systemd-analyze verify on it pointed at the binary under test; the manual
pages against the real command line and docs/config.md; the man page's
example config through portico -t; logrotate (SIGUSR1 reopens); versions and build
dependencies in step with configure.ac and scripts/install-deps.sh."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEB = ROOT / "packaging" / "debian"
MAN = ROOT / "packaging" / "man"
UNIT = DEB / "portico.service"
CONF = "/etc/portico/portico.json"


def unit_entries():
    """[(section, key, value)] in file order (systemd allows repeated keys)."""
    out, section = [], None
    for ln in UNIT.read_text().splitlines():
        ln = ln.strip()
        if not ln or ln.startswith(("#", ";")):
            continue
        if ln.startswith("["):
            section = ln.strip("[]")
            continue
        k, _, v = ln.partition("=")
        out.append((section, k.strip(), v.strip()))
    return out


def service(key):
    return [v for s, k, v in unit_entries() if s == "Service" and k == key]


def test_unit_commands_check_the_config_first():
    assert service("ExecStartPre") == ["/usr/sbin/portico -t -c " + CONF]
    assert service("ExecStart") == ["/usr/sbin/portico -c " + CONF]
    # Sequential ExecReload lines: a failing check stops the reload before
    # the signal (systemd runs no shell, so "&&" would not work on one line).
    assert service("ExecReload") == ["/usr/sbin/portico -t -c " + CONF, "/bin/kill -HUP $MAINPID"]
    stop = service("TimeoutStopSec")[0]
    assert int(stop.rstrip("s")) > 30, "must exceed the default 30 s drain"


def test_unit_sandbox():
    want = {
        "User": "portico", "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }
    for k, v in want.items():
        assert service(k) == [v], "%s=%s expected, have %s" % (k, v, service(k))
    assert "@system-service" in service("SystemCallFilter")
    assert int(service("LimitNOFILE")[0]) >= 65536
    assert service("LogsDirectory") == ["portico"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path, portico_bin):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    unit = tmp_path / "portico.service"
    unit.write_text(UNIT.read_text().replace("/usr/sbin/portico", portico_bin))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # Unknown keys and bad values are only warnings: there must be none.
    assert str(unit) not in r.stderr + r.stdout, r.stderr


def test_man_page_portico_8_matches_the_command_line(portico_bin):
    page = (MAN / "portico.8").read_text()
    usage = subprocess.run([portico_bin, "-h"], capture_output=True, text=True).stdout
    opts = set(re.findall(r"^\s+-(\w)\b", usage, re.M))
    assert opts == {"c", "t", "V", "h"}, usage
    for o in opts:
        assert ".B \\-%s" % o in page or ".BI \\-%s" % o in page, "-%s not documented" % o
    for sig in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1"):
        assert sig in page, sig
    assert "does not reload" not in page
    assert CONF in page


def config_md_keys():
    """Keys in docs/config.md's tables, by section heading."""
    keys, section = {}, None
    for ln in (ROOT / "docs" / "config.md").read_text().splitlines():
        if ln.startswith("## ") or ln.startswith("### "):
            section = ln.lstrip("#").strip()
        m = re.match(r"\| `(\w+)` \|", ln)
        if m and section:
            keys.setdefault(section, []).append(m.group(1))
    return keys


def test_man_page_portico_json_5_names_every_documented_key():
    page = (MAN / "portico.json.5").read_text()
    keys = config_md_keys()
    assert {"Top level", "listeners", "limits", "upstreams", "routes"} <= set(keys), keys.keys()
    missing = []
    for section in ("Top level", "listeners", "limits", "access_log", "admin", "upstreams",
                    "routes", "respond"):
        for k in keys.get(section, []):
            if not re.search(r"\.BR? %s\b" % re.escape(k), page):
                missing.append("%s.%s" % (section, k))
    assert not missing, "in docs/config.md, not in portico.json(5): %s" % missing


def test_man_page_example_config_is_valid(tmp_path, portico_bin):
    page = (MAN / "portico.json.5").read_text()
    example = page.split(".SH EXAMPLE", 1)[1].split(".EX", 1)[1].split(".EE", 1)[0]
    path = tmp_path / "example.json"
    path.write_text(example.replace("\\-", "-"))
    r = subprocess.run([portico_bin, "-t", "-c", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("page", ["portico.8", "portico.json.5"])
def test_man_pages_render_without_warnings(page):
    if not shutil.which("man"):
        pytest.skip("man not installed (Debian package man-db)")
    r = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(MAN / page)],
                       capture_output=True, text=True, env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin",
                                                            "MANWIDTH": "80"})
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_logrotate_moves_the_file_and_signals_a_reopen(tmp_path):
    text = (DEB / "portico.logrotate").read_text()
    body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    # Portico reopens its access log on SIGUSR1: rotate by moving the file.
    assert "copytruncate" not in body
    post = body.split("postrotate", 1)[1].split("endscript", 1)[0]
    assert "--signal=USR1" in post and "--kill-whom=main" in post and "portico.service" in post
    if shutil.which("logrotate"):
        conf = tmp_path / "portico"
        conf.write_text(body.replace("/var/log/portico", str(tmp_path)).replace(
            "su portico portico", "").replace("create 0640 portico portico", "create 0640"))
        r = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(conf)],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "error" not in r.stderr.lower(), r.stderr


def test_versions_and_build_dependencies_agree():
    ac = re.search(r"AC_INIT\(\[portico\], \[([^]]+)\]", (ROOT / "configure.ac").read_text()).group(1)
    first = (DEB / "changelog").read_text().splitlines()[0]
    assert first.startswith("portico (%s) " % ac), (first, ac)
    control = (DEB / "control").read_text()
    deps = (ROOT / "scripts" / "install-deps.sh").read_text()
    runtime = re.search(r"RUNTIME_PKGS=\(([^)]*)\)", deps).group(1).split()
    for dev in (p for p in runtime if p.endswith("-dev")):
        assert re.search(r"\b%s\b" % re.escape(dev), control), "%s not in Build-Depends" % dev
    assert (DEB / "rules").stat().st_mode & 0o111, "debian/rules must be executable"
    for script in ("portico.postinst", "portico.postrm"):
        assert "#DEBHELPER#" in (DEB / script).read_text()
