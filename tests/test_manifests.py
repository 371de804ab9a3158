"""Offline checks of the deployment manifests (`ray-cluster/`) and the Dockerfile.

Rendering: both overlays (`ray-cluster/overlays/dev`, `.../prod`) are rendered with real
kustomize v5: `kubectl kustomize DIR` (kubectl >= 1.27 embeds it), or `kustomize build DIR`
when the kustomize binary is installed. Without either the tests fail; .ci/run checks for them
up front and builds kustomize from its Go module (pinned) when kubectl lacks kustomize v5.

What is checked, for every overlay:
- every document has a schema or a stated reason it has none: RayCluster / RayJob validate
  (jsonschema Draft 7) against the KubeRay v1.7.0 CRD schemas vendored in
  `tests/data/kuberay-crds` (`spec.versions[name=v1].schema.openAPIV3Schema`) and have no
  field the schema does not know (Kubernetes would silently prune a mistyped field); core kinds
  (Namespace, ServiceAccount, NetworkPolicy, and the pod templates inside the Ray kinds) validate
  strictly (no unknown fields) against the Kubernetes OpenAPI schemas that the pinned
  `kubernetes-validate` package ships; Strimzi's KafkaTopic / KafkaUser and the Prometheus
  Operator's PodMonitor have no offline schema here and are checked field by field below;
- every pod KubeRay will create (head with the autoscaler sidecar, workers with KubeRay's
  wait-gcs-ready init container, the RayJob submitter) meets Pod Security "restricted"
  (`tests/pod_security.py`), runs as the image's numeric user, has a read-only root file system
  with emptyDir volumes (each with a sizeLimit) for what it writes, and ephemeral-storage
  requests/limits that cover them; the spool volume holds every shard a worker can run;
- the Ray namespace enforces "restricted"; pods use a ServiceAccount without an API token; the
  NetworkPolicy admits to the head's GCS / dashboard / client ports only the cluster's pods and
  the namespaces the overlay names, and to the metrics ports the PodMonitors scrape;
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
import functools
import json
import re
import shutil
import subprocess
import tomllib
import typing
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr

from ray_forwarder.config import Settings
from ray_forwarder.ray.actors import IO_ACTOR_CPUS
from ray_forwarder.runtime.spool import SEGMENT_BYTES
from tests.pod_security import all_containers, restricted_violations

REPO = Path(__file__).resolve().parents[1]
RAY_CLUSTER = REPO / "ray-cluster"
OVERLAYS = ("dev", "prod")
SECRET_TEMPLATE = RAY_CLUSTER / "base" / "secret.example.yaml"
SECRET_NAME_PATTERN = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL", re.IGNORECASE)
CRDS_DIR = REPO / "tests" / "data" / "kuberay-crds"
RAY_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
#: Kinds validated against the Kubernetes schemas of these versions (oldest we document, newest
#: the pinned kubernetes-validate ships).
KUBERNETES_VERSIONS = ("1.30", "1.37")
CORE_KINDS = {"Namespace", "ServiceAccount", "NetworkPolicy"}
#: Kinds with no schema available offline, and what checks them instead.
UNVALIDATED_KINDS = {
    "KafkaTopic": "Strimzi CRD; test_topics_equal_settings_defaults",
    "KafkaUser": "Strimzi CRD; test_kafka_user_acls",
    "PodMonitor": "Prometheus Operator CRD; test_pod_monitors_scrape_declared_ports",
}
#: The image's user and group (rayproject/ray's `ray`:`users`), numeric in the Dockerfile.
IMAGE_UID, IMAGE_GID = 1000, 100

Doc = dict[str, Any]


# Rendering ----------------------------------------------------------------------------


@functools.cache
def kustomize_command() -> list[str]:
    """`kustomize build` when the kustomize binary is installed, else `kubectl kustomize`."""
    if path := shutil.which("kustomize"):
        return [path, "build"]
    if path := shutil.which("kubectl"):
        return [path, "kustomize"]
    pytest.fail(
        "kubectl (>= 1.27, with kustomize v5 built in) or kustomize v5 is required to render "
        "ray-cluster/; .ci/run checks for it and builds kustomize with `go install` if needed"
    )


def render(directory: Path) -> list[Doc]:
    """`kubectl kustomize DIR`, parsed; a kustomize error fails with its message."""
    result = subprocess.run(
        [*kustomize_command(), str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kustomize {directory} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def _rendered_overlay(name: str) -> str:
    return json.dumps(render(RAY_CLUSTER / "overlays" / name))


def rendered_overlay(name: str) -> list[Doc]:
    """A fresh copy of an overlay's documents (rendered once per session)."""
    return json.loads(_rendered_overlay(name))


# Fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict[str, Any]]:
    result = {}
    for kind, filename in RAY_KINDS.items():
        # libyaml's loader: the CRDs are 2 MB of YAML, a minute for the pure-Python one.
        crd = yaml.load((CRDS_DIR / filename).read_text(), Loader=yaml.CSafeLoader)
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        result[kind] = version["schema"]["openAPIV3Schema"]
    return result


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def rendered(overlay: str) -> list[Doc]:
    docs = rendered_overlay(overlay)
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


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """`name[:tag][@digest]` -> (name, tag, digest)."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def dockerfile_from() -> tuple[str, str]:
    lines = [
        line.split()
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if line.strip().upper().startswith("FROM ")
    ]
    final = lines[-1]  # the stage that becomes the image
    image = final[1] if not final[1].startswith("--") else final[2]
    name, tag, _ = split_image(image)
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
        _, image_tag, _ = split_image(image)
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
    # nine stock-era channel topics, eight of crypto/options/news, the dead-letter topic
    assert len(defaults) == 18
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
    docs = rendered_overlay("dev")
    cluster = one(docs, "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
    assert not cluster["spec"].get("enableInTreeAutoscaling")
    for topic in of_kind(docs, "KafkaTopic"):
        assert topic["spec"]["replicas"] == 1
        assert topic["spec"]["config"]["min.insync.replicas"] == 1


def test_prod_overlay_scales_and_replicates():
    docs = rendered_overlay("prod")
    cluster = one(docs, "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["replicas"] > 1 and group["maxReplicas"] > group["replicas"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["autoscalerOptions"]["version"] == "v2"
    for topic in of_kind(docs, "KafkaTopic"):
        assert topic["spec"]["replicas"] == 3
        assert topic["spec"]["config"]["min.insync.replicas"] == 2


# Schemas of the other kinds -----------------------------------------------------------


def core_errors(doc: Doc, version: str) -> list[str]:
    """Strict validation against the Kubernetes schema of `version` (unknown fields fail)."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'/'.join(map(str, error.path))}: {error.message}"]
    return []


def pod_templates(doc: Doc) -> list[tuple[str, Doc]]:
    """The pod templates inside a RayCluster / RayJob, as they would be given to Kubernetes."""
    spec = doc.get("spec") or {}
    if doc["kind"] == "RayCluster":
        return [("head", spec["headGroupSpec"]["template"])] + [
            (f"worker {g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]
        ]
    if doc["kind"] == "RayJob":
        return [("submitter", spec["submitterPodTemplate"])]
    return []


def as_core_pod_template(template: Doc) -> Doc:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "t"},
        "template": template,
    }


def test_every_kind_has_a_schema_or_a_stated_reason(rendered):
    kinds = {doc["kind"] for doc in rendered}
    known = set(RAY_KINDS) | CORE_KINDS | set(UNVALIDATED_KINDS)
    assert kinds <= known, f"kinds with no schema check: {sorted(kinds - known)}"
    assert kinds >= CORE_KINDS | set(RAY_KINDS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_documents_validate_against_kubernetes_schemas(rendered, version):
    for doc in rendered:
        if doc["kind"] in CORE_KINDS:
            errors = core_errors(doc, version)
            assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors}"
        for where, template in pod_templates(doc):
            errors = core_errors(as_core_pod_template(template), version)
            assert not errors, f"{doc['kind']} {where} pod template: {errors}"


def test_core_schema_check_rejects_broken_documents(rendered):
    policy = copy.deepcopy(one(rendered, "NetworkPolicy"))
    policy["spec"]["ingress"][0]["form"] = policy["spec"]["ingress"][0].pop("from")  # typo
    assert core_errors(policy, KUBERNETES_VERSIONS[0])

    account = copy.deepcopy(one_named(rendered, "ServiceAccount", "ray-forwarder-pods"))
    account["automountServiceAccountToken"] = "no"
    assert core_errors(account, KUBERNETES_VERSIONS[0])

    (_, template), *_ = pod_templates(one(rendered, "RayCluster"))
    template = copy.deepcopy(template)
    template["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True  # typo
    assert core_errors(as_core_pod_template(template), KUBERNETES_VERSIONS[0])


def one_named(docs: list[Doc], kind: str, name: str) -> Doc:
    (found,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return found


# Pods as KubeRay creates them ---------------------------------------------------------


def pods(docs: list[Doc]) -> list[tuple[str, Doc, Doc]]:
    """(where, metadata, pod spec) of every pod the Ray kinds make, with what KubeRay adds
    that matters to Pod Security: the autoscaler sidecar (from autoscalerOptions) on the head,
    and the wait-gcs-ready init container on workers (a copy of the Ray container's
    securityContext and volumeMounts)."""
    found = []
    for doc in docs:
        for where, template in pod_templates(doc):
            spec = copy.deepcopy(template["spec"])
            if where == "head" and doc["spec"].get("enableInTreeAutoscaling"):
                options = doc["spec"].get("autoscalerOptions") or {}
                spec["containers"].append(
                    {
                        "name": "autoscaler",
                        "securityContext": options.get("securityContext"),
                        "volumeMounts": options.get("volumeMounts") or [],
                        "resources": options.get("resources") or {},
                    }
                )
            if where.startswith("worker"):
                ray = spec["containers"][0]
                spec.setdefault("initContainers", []).append(
                    {
                        "name": "wait-gcs-ready",
                        "securityContext": copy.deepcopy(ray.get("securityContext")),
                        "volumeMounts": copy.deepcopy(ray.get("volumeMounts") or []),
                    }
                )
            found.append((f"{doc['kind']} {where}", template.get("metadata") or {}, spec))
    return found


def test_every_pod_meets_the_restricted_profile(rendered):
    found = pods(rendered)
    assert {where for where, _, _ in found} == {
        "RayCluster head",
        "RayCluster worker io",
        "RayJob submitter",
    }
    for where, metadata, spec in found:
        assert restricted_violations(spec, metadata) == [], where


def test_restricted_check_rejects_what_the_profile_forbids(rendered):
    _, metadata, spec = pods(rendered)[0]
    broken = [
        (
            "allowPrivilegeEscalation",
            lambda c, p: c["securityContext"].pop("allowPrivilegeEscalation"),
        ),
        (
            "drop must include ALL",
            lambda c, p: c["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
        ),
        (
            "capabilities.add",
            lambda c, p: c["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        ),
        (
            "seccompProfile",
            lambda c, p: (
                c["securityContext"].pop("seccompProfile"),
                p["securityContext"].pop("seccompProfile"),
            ),
        ),
        (
            "seccompProfile",
            lambda c, p: c["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        ),
        (
            "runAsNonRoot",
            lambda c, p: (
                c["securityContext"].pop("runAsNonRoot"),
                p["securityContext"].pop("runAsNonRoot"),
            ),
        ),
        ("runAsUser", lambda c, p: c["securityContext"].update(runAsUser=0)),
        ("privileged", lambda c, p: c["securityContext"].update(privileged=True)),
        ("hostPort", lambda c, p: c["ports"][0].update(hostPort=6379)),
        ("hostNetwork", lambda c, p: p.update(hostNetwork=True)),
        ("not allowed", lambda c, p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
    ]
    for expected, breaks in broken:
        pod = copy.deepcopy(spec)
        breaks(pod["containers"][0], pod)
        problems = restricted_violations(pod, metadata)
        assert any(expected in p for p in problems), (expected, problems)


def test_containers_run_as_the_image_user_on_a_read_only_root(rendered):
    for where, _, spec in pods(rendered):
        pod_sc = spec["securityContext"]
        assert (pod_sc["runAsUser"], pod_sc["runAsGroup"], pod_sc["fsGroup"]) == (
            IMAGE_UID,
            IMAGE_GID,
            IMAGE_GID,
        ), where
        assert spec["automountServiceAccountToken"] is False, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in all_containers(spec):
            sc = container["securityContext"]
            name = f"{where} {container['name']}"
            assert sc["readOnlyRootFilesystem"] is True, name
            assert (sc["runAsUser"], sc["runAsGroup"]) == (IMAGE_UID, IMAGE_GID), name
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert "/tmp" in mounts, f"{name}: /tmp is not writable"
            for mount in mounts.values():
                assert mount["name"] in volumes, f"{name}: no volume {mount['name']}"
                volume = volumes[mount["name"]]
                if "emptyDir" in volume:
                    assert volume["emptyDir"].get("sizeLimit"), f"{name}: {mount['name']}"
            if container["name"] in ("ray-head", "ray-worker", "autoscaler", "wait-gcs-ready"):
                assert mounts["/tmp/ray"]["name"] == "ray-logs", name


def test_read_only_root_check_detects_a_missing_tmp(rendered):
    docs = copy.deepcopy(rendered)
    cluster = one(docs, "RayCluster")
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["volumeMounts"] = [m for m in worker["volumeMounts"] if m["mountPath"] != "/tmp"]
    with pytest.raises(AssertionError, match="/tmp is not writable"):
        test_containers_run_as_the_image_user_on_a_read_only_root(docs)


def quantity_bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(value))
    assert match and match.group(2) in {"", *units}, f"unexpected quantity {value!r}"
    return int(match.group(1)) * units.get(match.group(2), 1)


#: Room for each container's stdout/stderr logs, which the kubelet counts as ephemeral storage.
CONTAINER_LOG_BYTES = 64 * 2**20


def ephemeral_storage_problems(docs: list[Doc]) -> list[str]:
    """Each pod's ephemeral-storage (requests = limits) must hold its disk emptyDirs at their
    sizeLimit plus each container's logs: the kubelet evicts a pod above the sum."""
    problems = []
    for where, _, spec in pods(docs):
        disk_volumes = sum(
            quantity_bytes(v["emptyDir"]["sizeLimit"])
            for v in spec.get("volumes") or []
            if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
        )
        containers = spec["containers"]
        requests = [c["resources"]["requests"].get("ephemeral-storage") for c in containers]
        limits = [c["resources"]["limits"].get("ephemeral-storage") for c in containers]
        if None in requests or requests != limits:
            problems.append(f"{where}: ephemeral-storage requests {requests} limits {limits}")
            continue
        total = sum(quantity_bytes(q) for q in limits)
        needed = disk_volumes + CONTAINER_LOG_BYTES * len(containers)
        if total < needed:
            problems.append(f"{where}: ephemeral-storage {total} < volumes + logs {needed}")
    return problems


def test_ephemeral_storage_covers_the_volumes(rendered):
    assert ephemeral_storage_problems(rendered) == []


def test_ephemeral_storage_shortfall_is_detected(rendered):
    docs = copy.deepcopy(rendered)
    worker = one(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    (spool,) = [v for v in worker["volumes"] if v["name"] == "spool"]
    spool["emptyDir"]["sizeLimit"] = "8Gi"
    assert any("worker" in p for p in ephemeral_storage_problems(docs))


def test_spool_volume_holds_every_shard_a_worker_can_run(rendered):
    """SPOOL_MAX_BYTES is per shard; a worker runs at most num-cpus / IO_ACTOR_CPUS actors,
    all of which may be shards, each with one open segment per lane (producer)."""
    env = runtime_env(one(rendered, "RayJob"))["env_vars"]
    # Only the settings that size the spool (the others may need secrets or files at run time).
    sizing = {"spool_dir", "spool_max_bytes", "producers"}
    settings = Settings.model_validate(
        {k.lower(): v for k, v in env.items() if k.lower() in sizing}
    )
    assert settings.spool_max_bytes > 0
    for group in one(rendered, "RayCluster")["spec"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        shards_per_worker = int(float(group["rayStartParams"]["num-cpus"]) / IO_ACTOR_CPUS)
        needed = shards_per_worker * (settings.spool_max_bytes + settings.producers * SEGMENT_BYTES)
        (mount,) = [
            m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == settings.spool_dir
        ]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert "subPath" not in mount
        assert quantity_bytes(volume["emptyDir"]["sizeLimit"]) >= needed, group["groupName"]


# Namespace, ServiceAccount, NetworkPolicy ----------------------------------------------


def test_ray_namespace_enforces_restricted(rendered):
    cluster = one(rendered, "RayCluster")
    namespace = one_named(rendered, "Namespace", cluster["metadata"]["namespace"])
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/enforce-version"] == "latest"
    namespaced = [d for d in rendered if d["kind"] != "Namespace"]
    assert {d["metadata"]["namespace"] for d in namespaced} == {
        namespace["metadata"]["name"],
        "kafka",
    }


def test_pods_use_a_service_account_without_a_token(rendered):
    account = one_named(rendered, "ServiceAccount", "ray-forwarder-pods")
    assert account["automountServiceAccountToken"] is False
    cluster = one(rendered, "RayCluster")
    for where, _, spec in pods(rendered):
        expected = "ray-forwarder-pods"
        if where == "RayCluster head" and cluster["spec"].get("enableInTreeAutoscaling"):
            expected = "ray-forwarder-autoscaler"
        assert spec["serviceAccountName"] == expected, where
        assert spec["automountServiceAccountToken"] is False, where
        one_named(rendered, "ServiceAccount", expected)


def test_only_the_autoscaler_sees_an_api_token():
    docs = rendered_overlay("prod")
    (head,) = [spec for where, _, spec in pods(docs) if where == "RayCluster head"]
    token_volumes = {
        v["name"]
        for v in head["volumes"]
        if any("serviceAccountToken" in s for s in (v.get("projected") or {}).get("sources", []))
    }
    assert token_volumes
    for container in all_containers(head):
        mounted = {m["name"] for m in container.get("volumeMounts") or []}
        assert bool(mounted & token_volumes) == (container["name"] == "autoscaler")


HEAD_CLIENT_PORTS = {6379, 8265, 10001}


def network_policy_problems(docs: list[Doc]) -> list[str]:
    cluster = one(docs, "RayCluster")
    policy = one(docs, "NetworkPolicy")["spec"]
    problems = []
    if policy["podSelector"] != {"matchLabels": {"ray.io/cluster": cluster["metadata"]["name"]}}:
        problems.append(f"selects {policy['podSelector']}")
    if "Ingress" not in policy["policyTypes"]:
        problems.append("does not restrict ingress")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["containerPort"] for p in head["ports"]}
    metrics_ports = {
        p["containerPort"]
        for p in head["ports"]
        if p["name"]
        in {
            e["port"] for m in of_kind(docs, "PodMonitor") for e in m["spec"]["podMetricsEndpoints"]
        }
    }
    for index, rule in enumerate(policy["ingress"]):
        ports = {p["port"] for p in rule.get("ports") or []} or None
        for peer in rule["from"]:
            if "ipBlock" in peer:
                problems.append(f"ingress/{index}: ipBlock peer")
            elif "namespaceSelector" in peer:
                (expression,) = peer["namespaceSelector"]["matchExpressions"]
                if expression["key"] != "kubernetes.io/metadata.name" or not expression["values"]:
                    problems.append(f"ingress/{index}: namespaces not named")
                if ports is None or not ports <= head_ports:
                    problems.append(f"ingress/{index}: namespaces admitted to {ports}")
            elif peer["podSelector"] != {
                "matchLabels": {"ray.io/cluster": cluster["metadata"]["name"]}
            } and (ports is None or ports & (HEAD_CLIENT_PORTS - {8265})):
                problems.append(f"ingress/{index}: other pods admitted to {ports}")
    admitted_metrics = {
        p["port"]
        for rule in policy["ingress"]
        if any("namespaceSelector" in peer for peer in rule["from"])
        for p in rule.get("ports") or []
        if p["port"] not in HEAD_CLIENT_PORTS
    }
    if admitted_metrics != metrics_ports:
        problems.append(f"metrics ports admitted {admitted_metrics} != scraped {metrics_ports}")
    return problems


def test_network_policy_admits_only_the_cluster_and_named_namespaces(rendered):
    assert network_policy_problems(rendered) == []
    policy = one(rendered, "NetworkPolicy")["spec"]
    named = [
        set(peer["namespaceSelector"]["matchExpressions"][0]["values"])
        for rule in policy["ingress"]
        for peer in rule["from"]
        if "namespaceSelector" in peer
    ]
    assert named == [{"ray-system"}, {"monitoring"}]


def test_network_policy_gaps_are_detected(rendered):
    docs = copy.deepcopy(rendered)
    policy = one(docs, "NetworkPolicy")["spec"]
    policy["ingress"][2]["from"][0]["namespaceSelector"] = {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "Exists", "values": []}
        ]
    }
    policy["ingress"][2].pop("ports")
    policy["ingress"].append({"from": [{"podSelector": {}}], "ports": [{"port": 6379}]})
    problems = network_policy_problems(docs)
    assert any("namespaces not named" in p for p in problems)
    assert any("namespaces admitted to None" in p for p in problems)
    assert any("other pods admitted" in p for p in problems)


def test_render_reports_kustomize_errors(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n  - target: {kind: ConfigMap}\n    patch: |-\n"
        "      - op: replace\n        path: /data/missing\n        value: x\n"
    )
    with pytest.raises(RuntimeError, match=r"kustomize .* failed: .*missing"):
        render(tmp_path)
