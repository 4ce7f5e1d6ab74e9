"""packaging/kubernetes: the manifests parse, carry the fields a cluster
needs, agree with each other (selectors and pod labels, ports, Secret and
ConfigMap keys, the addresses in Portico's config and the Services' cluster
IPs), and the ConfigMap's config passes `portico -t` (in full when the
binary has every module it uses; otherwise the part this binary can check,
and the full check is reported as skipped)."""
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

import dockerfile

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "packaging" / "kubernetes"
FILTER_MODULES = ("jwt_auth", "rate_limit")


def load_docs():
    docs = []
    for f in sorted(K8S.glob("*.y*ml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                docs.append((f.name, d))
    return docs


DOCS = load_docs()


def of_kind(kind):
    return [d for _, d in DOCS if d.get("kind") == kind]


def one(kind, name):
    found = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, "%s/%s: %d found" % (kind, name, len(found))
    return found[0]


def config_text():
    return one("ConfigMap", "portico-config")["data"]["portico.json"]


def portico_pod():
    return one("Deployment", "portico")["spec"]["template"]


def portico_container():
    return [c for c in portico_pod()["spec"]["containers"] if c["name"] == "portico"][0]


def test_kinds_and_api_versions():
    want = {"Deployment": "apps/v1", "Service": "v1", "ConfigMap": "v1", "Secret": "v1",
            "HorizontalPodAutoscaler": "autoscaling/v2", "PodDisruptionBudget": "policy/v1",
            "Kustomization": "kustomize.config.k8s.io/v1beta1"}
    seen = {}
    for f, d in DOCS:
        assert d.get("kind") in want, "%s: unexpected kind %r" % (f, d.get("kind"))
        assert d.get("apiVersion") == want[d["kind"]], "%s: %s apiVersion %s" % (
            f, d["kind"], d.get("apiVersion"))
        if d["kind"] != "Kustomization":
            assert d["metadata"].get("name"), f
        seen.setdefault(d["kind"], 0)
        seen[d["kind"]] += 1
    assert set(seen) == set(want), set(want) - set(seen)


def test_kustomization_lists_every_manifest():
    kust = of_kind("Kustomization")[0]
    files = {f.name for f in K8S.glob("*.y*ml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def test_deployments_selectors_probes_resources_security():
    for dep in of_kind("Deployment"):
        name = dep["metadata"]["name"]
        tmpl = dep["spec"]["template"]
        sel = dep["spec"]["selector"]["matchLabels"]
        labels = tmpl["metadata"]["labels"]
        assert sel and all(labels.get(k) == v for k, v in sel.items()), name
        assert tmpl["spec"]["securityContext"]["runAsNonRoot"] is True, name
        for c in tmpl["spec"]["containers"]:
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in c, "%s/%s: no %s" % (name, c["name"], probe)
                target = c[probe].get("tcpSocket") or c[probe].get("httpGet")
                port = target["port"]
                assert port in ports or port in ports.values(), "%s: %s port %r" % (
                    name, probe, port)
            req = c["resources"]["requests"]
            assert req.get("cpu") and req.get("memory"), name
            assert c["resources"]["limits"].get("memory"), name
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]


def test_portico_deployment_replicas_drain_and_user():
    dep = one("Deployment", "portico")
    assert dep["spec"]["replicas"] >= 3
    cfg = json.loads(config_text())
    drain_s = cfg.get("limits", {}).get("drain_timeout_ms", 30000) / 1000
    c = portico_container()
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[0] == "sleep"
    grace = portico_pod()["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(pre[1]) + drain_s, (grace, pre, drain_s)
    # The image's user (packaging/Dockerfile) is the pod's.
    ins = dockerfile.parse(ROOT / "packaging" / "Dockerfile")
    uid = [i for i in ins if i.op == "USER"][-1].args.split(":")[0]
    assert str(portico_pod()["spec"]["securityContext"]["runAsUser"]) == uid
    # The config is mounted where the container is told to read it.
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in portico_pod()["spec"]["volumes"]}
    args = c["args"]
    cfg_path = args[args.index("-c") + 1]
    cfg_mount = [m for m in mounts.values() if m["mountPath"] == cfg_path]
    assert cfg_mount, "nothing mounted at %s" % cfg_path
    cm = vols[cfg_mount[0]["name"]]["configMap"]["name"]
    assert cfg_mount[0]["subPath"] in one("ConfigMap", cm)["data"]
    # The listener is the container's port, and the Service targets it.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    port = int(cfg["listeners"][0]["address"].rsplit(":", 1)[1])
    assert port in ports.values()
    # Probes ask the admin API: readiness /readyz (503 while draining),
    # liveness /healthz, on the port the config's admin listener has.
    admin = int(cfg["admin"]["address"].rsplit(":", 1)[1])
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, (probe, get)
        assert ports.get(get["port"], get["port"]) == admin, (probe, get)


def secret_files():
    """{path in the container: (secret, key)} for mounted Secret items."""
    c = portico_container()
    vols = {v["name"]: v for v in portico_pod()["spec"]["volumes"]}
    out = {}
    for m in c["volumeMounts"]:
        sec = vols[m["name"]].get("secret")
        if sec:
            for item in sec["items"]:
                out["%s/%s" % (m["mountPath"], item["path"])] = (sec["secretName"], item["key"])
    return out


def test_secrets_reach_the_config():
    c = portico_container()
    text = config_text()
    env = {e["name"]: e for e in c.get("env", [])}
    for var in set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)):
        assert var in env, "${%s} is not in the container's env" % var
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in one("Secret", ref["name"])["stringData"], ref
    files = secret_files()
    for path in re.findall(r'"@(/[^"]+)"', text):
        assert path in files, "@%s is not a mounted Secret item" % path
        sec, key = files[path]
        assert key in one("Secret", sec)["stringData"]


def test_services_select_pods_and_ports():
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in of_kind("Deployment")}
    cfg = json.loads(config_text())
    addrs = set()
    for u in cfg["upstreams"].values():
        addrs |= set(u["endpoints"])
    if "redis" in cfg:
        addrs.add(cfg["redis"]["address"])
    for svc in of_kind("Service"):
        sel = svc["spec"]["selector"]
        matches = [n for n, t in pods.items()
                   if all(t["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        ip = svc["spec"].get("clusterIP")
        if ip:
            # A backend whose address Portico's config names (Portico takes
            # IP literals only): it must be named there, port included.
            assert any(a == "%s:%d" % (ip, p["port"]) for p in svc["spec"]["ports"] for a in addrs), \
                "Service %s (%s) is not in the config's addresses %s" % (svc["metadata"]["name"], ip, addrs)
            addrs -= {"%s:%d" % (ip, p["port"]) for p in svc["spec"]["ports"]}
        if not matches:
            assert ip, "Service %s selects no pod here" % svc["metadata"]["name"]
            continue
        for t in (pods[m] for m in matches):
            ports = {}
            for c in t["spec"]["containers"]:
                ports.update({p.get("name"): p["containerPort"] for p in c.get("ports", [])})
            for p in svc["spec"]["ports"]:
                tp = p.get("targetPort", p["port"])
                assert tp in ports or tp in ports.values(), (svc["metadata"]["name"], tp)
    assert not addrs, "addresses in the config that no Service has: %s" % addrs


def test_hpa_and_pdb_target_portico():
    hpa = one("HorizontalPodAutoscaler", "portico")["spec"]
    dep = one("Deployment", "portico")
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "portico"}
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert hpa["metrics"]
    pdb = one("PodDisruptionBudget", "portico")["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in pdb["selector"]["matchLabels"].items())
    assert 0 < pdb["minAvailable"] < min(hpa["minReplicas"], dep["spec"]["replicas"])


def modules_of(binary):
    out = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10).stdout
    for ln in out.splitlines():
        if ln.startswith("modules:"):
            return set(ln.split(":", 1)[1].split())
    return set()


def check_env(tmp_path):
    """The config with its secrets made real: env values and key files."""
    key = tmp_path / "jwt.pem"
    pub = tmp_path / "jwt-public.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-out", str(key)], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True,
                   capture_output=True)
    text = config_text()
    for path in secret_files():
        text = text.replace("@" + path, "@" + str(pub))
    env = {e["name"]: "k8s-test-value-%d" % i for i, e in enumerate(portico_container()["env"])}
    return text, env


def portico_t(portico_bin, text, env, tmp_path):
    import os
    path = tmp_path / "portico.json"
    path.write_text(text)
    return subprocess.run([portico_bin, "-t", "-c", str(path)], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=10)


def test_config_passes_portico_t_where_this_binary_can_check_it(portico_bin, tmp_path):
    text, env = check_env(tmp_path)
    missing = [m for m in FILTER_MODULES if m not in modules_of(portico_bin)]
    cfg = json.loads(text)
    if "jwt_auth" in missing:
        cfg.pop("jwt_providers", None)
    if "rate_limit" in missing:
        cfg.pop("redis", None)
    for holder in [cfg] + cfg["routes"]:
        if "filters" in holder:
            holder["filters"] = [f for f in holder["filters"] if not set(f) & set(missing)]
    r = portico_t(portico_bin, json.dumps(cfg), env, tmp_path)
    assert r.returncode == 0, r.stderr


def test_config_passes_portico_t_in_full(portico_bin, tmp_path):
    missing = [m for m in FILTER_MODULES if m not in modules_of(portico_bin)]
    if missing:
        pytest.skip("the ConfigMap's config uses %s, not built into %s (portico -V); "
                    "the rest of it was checked" % (", ".join(missing), portico_bin))
    text, env = check_env(tmp_path)
    r = portico_t(portico_bin, text, env, tmp_path)
    assert r.returncode == 0, r.stderr
