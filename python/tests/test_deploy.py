"""The deployment files under ``deploy/`` against the worker's real settings.

The Kubernetes manifests are rendered with the machine's ``kubectl
kustomize`` and checked against ``dfship.settings("worker")``; then a real
worker starts with the manifest's own arguments and answers the probes the
manifest names. ``python -m dfship demo`` (the compose and Kubernetes
coordinators' command) runs against a real local cluster. The compose file
is brought up for real by the container suite (integration-tests).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

import dfship

ROOT = Path(__file__).resolve().parents[2]


def _render() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("kubectl is not installed: the Kubernetes manifests cannot be rendered")
        pytest.skip("kubectl is not installed")
    done = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy" / "k8s")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} rendered"
    return found[0]


def _flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as a dict (the manifests use only that form)."""
    out = {}
    for arg in args:
        assert arg.startswith("--") and "=" in arg, f"write flags as --name=value: {arg!r}"
        name, value = arg.split("=", 1)
        out[name] = value
    return out


def _seconds(text: str) -> float:
    for unit, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_kubernetes_manifests_agree_with_the_worker_settings(tmp_path: Path) -> None:
    docs = _render()
    settings = {s["flag"]: s for s in dfship.settings("worker")}
    deployment = _one(docs, "Deployment", "dfship-worker")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)
    container = pod["spec"]["containers"][0]
    flags = _flags(container["args"])
    unknown = set(flags) - set(settings)
    assert not unknown, f"flags the worker does not have: {unknown}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == int(flags["--port"])
    assert ports["http"] == int(flags["--http-port"])

    # Probes: on the --http-port, at the paths the worker serves.
    probes = (("readinessProbe", "/readyz"), ("livenessProbe", "/livez"), ("startupProbe", "/livez"))
    for probe, path in probes:
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports[get["port"]] == int(flags["--http-port"]), probe

    # The key: a Secret, read-only, 0400, at the path of --cluster-key-file.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "cluster-key")
    assert mount["readOnly"] is True
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "cluster-key")
    secret = volume["secret"]
    assert secret["defaultMode"] == 0o400
    item = secret["items"][0]
    assert f"{mount['mountPath']}/{item['path']}" == flags["--cluster-key-file"]
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["fsGroup"] == security["runAsGroup"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]

    # SIGTERM drains: the grace period outlasts the notice and the timeout.
    drain = _seconds(flags.get("--drain-timeout", settings["--drain-timeout"]["default"]))
    notice = _seconds(flags.get("--drain-notice", settings["--drain-notice"]["default"]))
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain + notice

    # Discovery: the coordinator's dns:// name is the headless Service, on the worker port.
    service = _one(docs, "Service", "dfship-workers")
    assert service["spec"]["clusterIP"] == "None"
    assert _selects(service["spec"]["selector"], labels)
    assert service["spec"]["ports"][0]["targetPort"] == "grpc"
    job = _one(docs, "Job", "dfship-demo")
    coordinator = job["spec"]["template"]["spec"]["containers"][0]
    coordinator_flags = _flags(coordinator["args"])
    service_port = service["spec"]["ports"][0]["port"]
    assert coordinator_flags["--workers"] == f"dns://{service['metadata']['name']}:{service_port}"
    coordinator_settings = {s["flag"] for s in dfship.settings("coordinator")}
    assert "--cluster-key-file" in coordinator_settings
    assert coordinator_flags["--cluster-key-file"] == flags["--cluster-key-file"]

    # Only coordinators and workers reach the gRPC port; every object is namespaced alike.
    policy = _one(docs, "NetworkPolicy")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    grpc_rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == int(flags["--port"]))
    allowed = [rule["podSelector"]["matchLabels"] for rule in grpc_rule["from"]]
    assert any(_selects(a, job["spec"]["template"]["metadata"]["labels"]) for a in allowed)
    assert any(_selects(a, labels) for a in allowed)
    budget = _one(docs, "PodDisruptionBudget")
    assert _selects(budget["spec"]["selector"]["matchLabels"], labels)
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == {_one(docs, "Namespace")["metadata"]["name"]}

    # The manifest's own arguments start a real worker whose probes answer.
    key = tmp_path / "cluster.key"
    key.write_text("a key for this test")
    key.chmod(0o400)
    run_flags = {
        **flags,
        "--host": "127.0.0.1",
        "--port": str(_free_port()),
        "--http-port": str(_free_port()),
        "--cluster-key-file": str(key),
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "dfship", "worker", *[f"{k}={v}" for k, v in run_flags.items()]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{run_flags['--http-port']}"
        for path in ("/livez", "/readyz"):
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(base + path, timeout=2) as response:
                        assert response.status == 200
                        break
                except (urllib.error.URLError, ConnectionError):
                    if worker.poll() is not None:
                        stderr = worker.stderr.read() if worker.stderr else ""
                        pytest.fail(f"the worker exited: {stderr}")
                    assert time.monotonic() < deadline, f"{path} did not answer within 30 s"
                    time.sleep(0.1)
    finally:
        worker.kill()
        worker.wait()


def test_the_compose_file_names_real_worker_flags() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    settings = {s["flag"] for s in dfship.settings("worker")}
    worker = compose["services"]["worker"]
    flags = _flags(worker["command"])
    assert set(flags) <= settings, set(flags) - settings
    assert f"/run/secrets/{worker['secrets'][0]}" == flags["--cluster-key-file"]
    assert f"--http-port={flags['--http-port']}" in " ".join(worker["command"])
    assert f":{flags['--http-port']}/readyz" in " ".join(worker["healthcheck"]["test"])
    coordinator = compose["services"]["coordinator"]
    assert _flags(coordinator["command"])["--workers"] == f"dns://worker:{flags['--port']}"
    grace = _seconds(worker["stop_grace_period"])
    assert grace > _seconds(flags["--drain-timeout"]) + 3


@pytest.mark.parametrize("where", ["in-memory", "data-dir"])
def test_the_demo_command_runs_every_query_on_a_real_cluster(where: str, tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "demo")] if where == "data-dir" else []
    with dfship.LocalCluster(workers=2) as cluster:
        workers = ",".join(cluster.urls)
        done = subprocess.run(
            [sys.executable, "-m", "dfship", "demo", "--workers", workers, "--rows=3000", *data]
            + ["--cluster-key-file", str(cluster.key_file)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr
    from dfship.demo import queries

    titles = [title for title, _ in queries()]
    assert len(titles) == 5
    for title in titles:
        assert f"== {title}" in done.stdout
    assert "5 queries ok; live workers 2" in done.stdout, done.stdout
    # The aggregate UDF agrees with the built-in avg on every city.
    assert "False" not in done.stdout.split("beside the built-in avg")[1].split("==")[0]


def test_the_demo_command_explains_a_missing_workers_flag() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DFSHIP_WORKERS"}
    done = subprocess.run(
        [sys.executable, "-m", "dfship", "demo"], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 2
    assert "--workers" in done.stderr and "dns://" in done.stderr
