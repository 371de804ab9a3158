"""Offline checks of the deployment manifests (`ray-cluster/`) and the Dockerfile.

Rendering: both overlays (`ray-cluster/overlays/dev`, `.../prod`) are rendered with
`tests/kustomize_lite.py`, a deliberately small renderer that implements only the kustomize
subset these manifests use (resources, components, namespace, JSON 6902 patches, map-only
strategic-merge patches, images) and raises on anything else. When `kustomize` or `kubectl`
is on PATH, `test_lite_renderer_matches_real_kustomize` renders with it too and requires the
same documents; without either binary that one cross-check is skipped, nothing else is.

What is checked, for every overlay:
- every RayCluster / RayJob validates (jsonschema Draft 7) against the KubeRay v1.7.0 CRD
  schemas (`spec.versions[name=v1].schema.openAPIV3Schema`) from `$KUBERAY_CRDS_DIR` or
  `../shared/kuberay-crds` next to the repository — missing CRDs fail the tests — and has no
  field the schema does not know (Kubernetes would silently prune a mistyped field);
- `rayVersion`, the Ray version in every image tag, the Dockerfile's `FROM` tag and `ray` in
  uv.lock agree, and so does the Python tag (py311) with `requires-python`;
- no Secret is rendered; the one Secret template holds placeholders only and is not applied;
- every secret env var (the `SecretStr` fields of `Settings`, `RAY_AUTH_TOKEN`, anything named
  like a password/secret/token) comes from `secretKeyRef`, and none is in `runtimeEnvYAML`;
- memory requests equal limits for every container (autoscaler sidecar included);
- the head has `num-cpus: "0"`; ports on a pod are distinct and `METRICS_PORT` is one of them;
- the KafkaUser has SCRAM-SHA-512, IdempotentWrite on the cluster and exactly Write+Describe on
  every KafkaTopic; the KafkaTopic names equal the `topic_*` defaults of `Settings`;
- dev / prod differ as documented (workers, autoscaling, topic replication).
Negative tests feed deliberately broken documents to the same checks.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tomllib
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import SecretStr

from ray_forwarder.config import Settings
from tests import kustomize_lite

REPO = Path(__file__).resolve().parents[1]
RAY_CLUSTER = REPO / "ray-cluster"
OVERLAYS = ("dev", "prod")
SECRET_TEMPLATE = RAY_CLUSTER / "base" / "secret.example.yaml"
SECRET_NAME_PATTERN = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL", re.IGNORECASE)
RAY_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}

Doc = dict[str, Any]


# Fixtures -----------------------------------------------------------------------------


def crds_dir() -> Path:
    env = os.environ.get("KUBERAY_CRDS_DIR")
    return Path(env) if env else REPO.parent / "shared" / "kuberay-crds"


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict[str, Any]]:
    directory = crds_dir()
    result = {}
    for kind, filename in RAY_KINDS.items():
        path = directory / filename
        if not path.is_file():
            pytest.fail(
                f"KubeRay CRD {path} not found: set KUBERAY_CRDS_DIR to the directory with "
                f"{', '.join(RAY_KINDS.values())}"
            )
        crd = yaml.safe_load(path.read_text())
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        result[kind] = version["schema"]["openAPIV3Schema"]
    return result


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def rendered(overlay: str) -> list[Doc]:
    docs = kustomize_lite.render(RAY_CLUSTER / "overlays" / overlay)
    assert docs, f"overlay {overlay} rendered nothing"
    return docs


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc.get("kind") == kind]


def one(docs: list[Doc], kind: str) -> Doc:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# Helpers (also used by the negative tests) --------------------------------------------


def schema_errors(doc: Doc, schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]
    return errors + [f"{p}: unknown field" for p in unknown_fields(doc, schema)]


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields that a structural schema would prune (not declared, not preserved)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                found += unknown_fields(item, properties[key], f"{path}/{key}")
            elif isinstance(additional, dict):
                found += unknown_fields(item, additional, f"{path}/{key}")
            elif properties is not None and additional is not True:
                found.append(f"{path}/{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}/{index}")
    return found


def containers(node: Any, path: str = "") -> list[tuple[str, Doc]]:
    """Every container (any `containers` / `initContainers` list, at any depth)."""
    found: list[tuple[str, Doc]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += [(f"{path}/{key}/{c.get('name')}", c) for c in value]
            found += containers(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found += containers(item, f"{path}/{index}")
    return found


def secret_env_names() -> set[str]:
    names = {"RAY_AUTH_TOKEN"}
    for field_name, field in Settings.model_fields.items():
        annotation = field.annotation
        if annotation is SecretStr or SecretStr in typing.get_args(annotation):
            names.add(field_name.upper())
    return names


def is_secret_name(name: str) -> bool:
    return name in secret_env_names() or bool(SECRET_NAME_PATTERN.search(name))


def literal_secret_env(docs: list[Doc]) -> list[str]:
    """Secret-holding env vars that do not come from a secretKeyRef."""
    problems = []
    for doc in docs:
        for where, container in containers(doc):
            for env in container.get("env") or []:
                if not is_secret_name(env["name"]):
                    continue
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if "value" in env or not ref or not ref.get("name") or not ref.get("key"):
                    problems.append(f"{doc['kind']}/{doc['metadata']['name']}{where}:{env['name']}")
    return problems


def memory_mismatches(docs: list[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        resources = [(where, c.get("resources") or {}) for where, c in containers(doc)]
        autoscaler = (doc.get("spec") or {}).get("autoscalerOptions")
        if autoscaler is not None:
            resources.append(("/spec/autoscalerOptions", autoscaler.get("resources") or {}))
        for where, res in resources:
            request = (res.get("requests") or {}).get("memory")
            limit = (res.get("limits") or {}).get("memory")
            if request is None or request != limit:
                problems.append(
                    f"{doc['kind']}/{doc['metadata']['name']}{where}: {request}/{limit}"
                )
    return problems


def runtime_env(job: Doc) -> dict[str, Any]:
    return yaml.safe_load(job["spec"]["runtimeEnvYAML"]) or {}


def lock_ray_version() -> str:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    (ray,) = [p for p in lock["package"] if p["name"] == "ray"]
    return ray["version"]


def python_tag() -> str:
    """`py311` from requires-python (pyproject and uv.lock must agree)."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    tags = set()
    for spec in (pyproject["project"]["requires-python"], lock["requires-python"]):
        match = re.fullmatch(r">=\s*3\.(\d+)(\.\d+)?", spec.strip())
        assert match, f"unexpected requires-python {spec!r}"
        tags.add(f"py3{match.group(1)}")
    assert len(tags) == 1, f"pyproject and uv.lock disagree on requires-python: {tags}"
    return tags.pop()


def dockerfile_from() -> tuple[str, str]:
    lines = [
        line.split()
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if line.strip().upper().startswith("FROM ")
    ]
    final = lines[-1]  # the stage that becomes the image
    image = final[1] if not final[1].startswith("--") else final[2]
    name, tag, _ = kustomize_lite.split_image(image)
    assert tag, f"Dockerfile FROM {image} has no tag"
    return name, tag


def ray_images(docs: list[Doc]) -> list[str]:
    images = []
    for doc in docs:
        if doc["kind"] in RAY_KINDS:
            images += [c["image"] for _, c in containers(doc)]
            autoscaler = (doc.get("spec") or {}).get("autoscalerOptions") or {}
            if "image" in autoscaler:
                images.append(autoscaler["image"])
    return images


# Schema -------------------------------------------------------------------------------


def test_every_ray_document_validates_against_the_crd(rendered, schemas):
    assert of_kind(rendered, "RayCluster") and of_kind(rendered, "RayJob")
    for doc in rendered:
        if doc["kind"] in RAY_KINDS:
            assert doc["apiVersion"] == "ray.io/v1"
            errors = schema_errors(doc, schemas[doc["kind"]])
            assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors}"


def test_schema_check_rejects_broken_documents(rendered, schemas):
    cluster = copy.deepcopy(one(rendered, "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert schema_errors(cluster, schemas["RayCluster"])

    cluster = copy.deepcopy(one(rendered, "RayCluster"))
    del cluster["spec"]["headGroupSpec"]
    assert schema_errors(cluster, schemas["RayCluster"])

    cluster = copy.deepcopy(one(rendered, "RayCluster"))
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}  # typo
    assert any("unknown field" in e for e in schema_errors(cluster, schemas["RayCluster"]))

    job = copy.deepcopy(one(rendered, "RayJob"))
    job["spec"]["clusterSelector"] = ["ray-forwarder"]
    assert schema_errors(job, schemas["RayJob"])


# Versions -----------------------------------------------------------------------------


def test_ray_and_python_versions_agree(rendered):
    ray_version, py = lock_ray_version(), python_tag()
    assert py == "py311"
    name, tag = dockerfile_from()
    assert name == "rayproject/ray"
    assert re.fullmatch(rf"{re.escape(ray_version)}-{py}(-cpu)?", tag), tag
    for cluster in of_kind(rendered, "RayCluster"):
        assert cluster["spec"]["rayVersion"] == ray_version
    images = ray_images(rendered)
    assert images
    for image in images:
        _, image_tag, _ = kustomize_lite.split_image(image)
        assert image_tag, f"{image} has no tag"
        assert f"ray{ray_version}" in image_tag.split("-"), f"{image}: not Ray {ray_version}"
        assert py in image_tag.split("-"), f"{image}: not {py}"
    assert len(set(images)) == 1, f"head, workers and submitter must share one image: {images}"


# Secrets ------------------------------------------------------------------------------


def test_no_secret_is_rendered(rendered):
    assert of_kind(rendered, "Secret") == []


def test_secret_template_holds_placeholders_only():
    (template,) = [d for d in yaml.safe_load_all(SECRET_TEMPLATE.read_text()) if d]
    assert template["kind"] == "Secret" and "data" not in template
    for key, value in template["stringData"].items():
        assert value.startswith("<placeholder"), f"{key} is not a placeholder"
    for kustomization in RAY_CLUSTER.rglob("kustomization.yaml"):
        data = yaml.safe_load(kustomization.read_text())
        listed = [*(data.get("resources") or []), *(data.get("components") or [])]
        assert not [r for r in listed if Path(r).name == SECRET_TEMPLATE.name], kustomization
        assert "secretGenerator" not in data, kustomization


def test_secret_env_vars_come_from_secret_key_ref(rendered):
    assert {"ALPACA_API_KEY_ID", "ALPACA_SECRET_KEY", "KAFKA_PASSWORD"} <= secret_env_names()
    assert literal_secret_env(rendered) == []
    head = one(rendered, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    head_env = {env["name"] for env in head["containers"][0]["env"]}
    assert {"ALPACA_API_KEY_ID", "ALPACA_SECRET_KEY", "KAFKA_PASSWORD"} <= head_env


def test_literal_secret_env_is_detected(rendered):
    cluster = copy.deepcopy(one(rendered, "RayCluster"))
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker.setdefault("env", []).append({"name": "KAFKA_PASSWORD", "value": "hunter2"})
    assert literal_secret_env([cluster])


def test_runtime_env_has_settings_but_no_secrets(rendered):
    job = one(rendered, "RayJob")
    env_vars = runtime_env(job)["env_vars"]
    assert env_vars["RAY_JOB_STOP_WAIT_TIME_S"] == "60"
    assert all(isinstance(v, str) for v in env_vars.values()), "runtime env values must be str"
    assert not [name for name in env_vars if is_secret_name(name)]
    assert job["spec"]["entrypoint"] == "python -m ray_forwarder"
    unknown = {name.lower() for name in env_vars} - set(Settings.model_fields)
    assert unknown <= {"ray_job_stop_wait_time_s"}, f"not forwarder settings: {unknown}"


# Resources, head, ports ---------------------------------------------------------------


def test_memory_requests_equal_limits(rendered):
    assert memory_mismatches(rendered) == []


def test_memory_mismatch_is_detected(rendered):
    cluster = copy.deepcopy(one(rendered, "RayCluster"))
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["resources"]["limits"]["memory"] = "64Gi"
    assert memory_mismatches([cluster])


def test_head_takes_no_actors(rendered):
    cluster = one(rendered, "RayCluster")
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_ports_are_distinct_and_metrics_port_is_exposed(rendered):
    cluster = one(rendered, "RayCluster")
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"]
    ]
    for pod in pods:
        ports = [p for c in pod["containers"] for p in c.get("ports") or []]
        numbers = [p["containerPort"] for p in ports]
        names = [p["name"] for p in ports]
        assert len(set(numbers)) == len(numbers) and len(set(names)) == len(names)
        assert all(len(n) <= 15 for n in names), "port names are limited to 15 characters"
        assert ("metrics", 8080) in {(p["name"], p["containerPort"]) for p in ports}
    head_ports = {
        p["name"]: p["containerPort"] for p in pods[0]["containers"][0].get("ports") or []
    }
    metrics_port = int(runtime_env(one(rendered, "RayJob"))["env_vars"]["METRICS_PORT"])
    assert head_ports.get("fwd-metrics") == metrics_port != 8080


def test_rayjob_targets_the_raycluster(rendered):
    cluster, job = one(rendered, "RayCluster"), one(rendered, "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    assert "rayClusterSpec" not in job["spec"]


def test_pod_monitors_scrape_declared_ports(rendered):
    cluster = one(rendered, "RayCluster")
    monitors = {
        m["spec"]["selector"]["matchLabels"]["ray.io/node-type"]: m
        for m in of_kind(rendered, "PodMonitor")
    }
    assert set(monitors) == {"head", "worker"}
    pods = {
        "head": [cluster["spec"]["headGroupSpec"]["template"]["spec"]],
        "worker": [g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]],
    }
    for node_type, monitor in monitors.items():
        assert monitor["metadata"]["namespace"] == cluster["metadata"]["namespace"]
        assert (
            monitor["spec"]["selector"]["matchLabels"]["ray.io/cluster"]
            == (cluster["metadata"]["name"])
        )
        for pod in pods[node_type]:
            declared = {p["name"] for c in pod["containers"] for p in c.get("ports") or []}
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                assert endpoint["port"] in declared, (node_type, endpoint["port"])
    head_ports = {e["port"] for e in monitors["head"]["spec"]["podMetricsEndpoints"]}
    assert {"metrics", "fwd-metrics"} <= head_ports


# Kafka --------------------------------------------------------------------------------


def topic_names(docs: list[Doc]) -> set[str]:
    return {t["spec"].get("topicName", t["metadata"]["name"]) for t in of_kind(docs, "KafkaTopic")}


def acl_problems(docs: list[Doc]) -> list[str]:
    user = one(docs, "KafkaUser")
    problems = []
    if user["spec"]["authentication"]["type"] != "scram-sha-512":
        problems.append("authentication is not scram-sha-512")
    granted: dict[tuple[str, str | None], set[str]] = {}
    for acl in user["spec"]["authorization"]["acls"]:
        if "operation" in acl:
            problems.append("deprecated singular `operation`")
        resource = acl["resource"]
        if resource["type"] == "topic" and resource.get("patternType", "literal") != "literal":
            problems.append(f"non-literal topic ACL {resource}")
        key = (resource["type"], resource.get("name"))
        granted.setdefault(key, set()).update(acl.get("operations") or [])
    if "IdempotentWrite" not in granted.get(("cluster", None), set()):
        problems.append("no IdempotentWrite on the cluster")
    for topic in topic_names(docs):
        if granted.get(("topic", topic)) != {"Write", "Describe"}:
            problems.append(f"topic {topic}: {granted.get(('topic', topic))}")
    extra = set(granted) - {("cluster", None)} - {("topic", t) for t in topic_names(docs)}
    if extra:
        problems.append(f"ACLs beyond the forwarder's topics: {sorted(map(str, extra))}")
    if granted.get(("cluster", None), set()) - {"IdempotentWrite"}:
        problems.append("cluster operations beyond IdempotentWrite")
    return problems


def test_kafka_user_acls(rendered):
    assert acl_problems(rendered) == []


def test_acl_gaps_are_detected(rendered):
    docs = copy.deepcopy(rendered)
    user = one(docs, "KafkaUser")
    user["spec"]["authorization"]["acls"] = [
        acl for acl in user["spec"]["authorization"]["acls"] if acl["resource"]["type"] != "cluster"
    ]
    user["spec"]["authorization"]["acls"][0]["operations"] = ["Describe"]
    problems = acl_problems(docs)
    assert any("IdempotentWrite" in p for p in problems)
    assert any(p.startswith("topic ") for p in problems)


def test_topics_equal_settings_defaults(rendered):
    defaults = {
        name: field.default
        for name, field in Settings.model_fields.items()
        if name.startswith("topic_")
    }
    assert len(defaults) == 10  # nine channel topics and the dead-letter topic
    assert topic_names(rendered) == set(defaults.values())
    user = one(rendered, "KafkaUser")
    for doc in [*of_kind(rendered, "KafkaTopic"), user]:
        assert doc["metadata"]["namespace"] == "kafka"
        assert doc["metadata"]["labels"]["strimzi.io/cluster"] == "kafka"
    for topic in of_kind(rendered, "KafkaTopic"):
        config = topic["spec"]["config"]
        assert int(config["retention.ms"]) > 0
        assert 1 <= int(config["min.insync.replicas"]) <= topic["spec"]["replicas"]
        assert topic["spec"]["partitions"] >= 1


# Overlays -----------------------------------------------------------------------------


def test_dev_overlay_is_small():
    docs = kustomize_lite.render(RAY_CLUSTER / "overlays" / "dev")
    cluster = one(docs, "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
    assert not cluster["spec"].get("enableInTreeAutoscaling")
    for topic in of_kind(docs, "KafkaTopic"):
        assert topic["spec"]["replicas"] == 1
        assert topic["spec"]["config"]["min.insync.replicas"] == 1


def test_prod_overlay_scales_and_replicates():
    docs = kustomize_lite.render(RAY_CLUSTER / "overlays" / "prod")
    cluster = one(docs, "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["replicas"] > 1 and group["maxReplicas"] > group["replicas"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["autoscalerOptions"]["version"] == "v2"
    for topic in of_kind(docs, "KafkaTopic"):
        assert topic["spec"]["replicas"] == 3
        assert topic["spec"]["config"]["min.insync.replicas"] == 2


# The renderer -------------------------------------------------------------------------


def real_kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _keyed(docs: list[Doc]) -> dict[tuple[str, str, str], str]:
    keyed = {}
    for doc in docs:
        metadata = doc.get("metadata") or {}
        key = (doc["kind"], metadata.get("namespace", ""), metadata["name"])
        assert key not in keyed, f"duplicate {key}"
        keyed[key] = json.dumps(doc, sort_keys=True)
    return keyed


@pytest.mark.parametrize("name", OVERLAYS)
def test_lite_renderer_matches_real_kustomize(name):
    command = real_kustomize()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    result = subprocess.run(
        [*command, str(RAY_CLUSTER / "overlays" / name)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    real = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert _keyed(kustomize_lite.render(RAY_CLUSTER / "overlays" / name)) == _keyed(real)


def test_lite_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(kustomize_lite.UnsupportedFeature):
        kustomize_lite.render(tmp_path)
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n  - target: {kind: ConfigMap}\n    patch: |-\n"
        "      - op: replace\n        path: /data/missing\n        value: 1\n"
    )
    with pytest.raises(kustomize_lite.PatchError):
        kustomize_lite.render(tmp_path)
