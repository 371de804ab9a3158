"""A small kustomize renderer for the tests: only the subset that `ray-cluster/` uses.

Not kustomize. It exists so `tests/test_manifests.py` can render the overlays where neither
`kustomize` nor `kubectl` is installed; where one of them is, a test renders both ways and
requires the same documents, which keeps this subset honest.

Supported (anything else in a kustomization file raises `UnsupportedFeature`):
- `resources`: YAML files (multi-document) and directories holding a kustomization;
- `components` (`kind: Component`): after the resources, each component's resources are
  added and its transformers run over everything accumulated so far;
- `namespace`: sets `metadata.namespace` on every namespaced resource (overriding);
- `patches` with `path` or inline `patch`, and an optional `target` (`kind`, `name` as a
  regular expression, `namespace`). A patch that is a YAML list is a JSON 6902 patch (ops
  add / remove / replace / test); a mapping is a strategic-merge patch restricted to maps:
  maps merge, `null` deletes, and a list anywhere in it raises, because real kustomize may
  merge lists by key (e.g. `name`) and this subset does not model that;
- `images` (`name`, `newName`, `newTag`, `digest`): rewrites `image` in every `containers`
  / `initContainers` list at any depth, as kustomize does for custom resources too.
Transformers run in kustomize's order: namespace, patches, images.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KNOWN_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "namespace",
    "patches",
    "images",
}
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
}

Doc = dict[str, Any]


class UnsupportedFeature(ValueError):
    """The kustomization uses something this subset does not implement."""


class PatchError(ValueError):
    """A patch does not apply (missing path, failed test, no target)."""


def render(path: str | Path) -> list[Doc]:
    """Render the kustomization in directory `path` into a list of documents."""
    return _build(Path(path), expect_component=False)


def _load_kustomization(directory: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        candidate = directory / name
        if candidate.is_file():
            data = yaml.safe_load(candidate.read_text()) or {}
            unknown = set(data) - KNOWN_FIELDS
            if unknown:
                raise UnsupportedFeature(
                    f"{candidate}: field(s) {sorted(unknown)} not supported by kustomize_lite"
                )
            return data
    raise FileNotFoundError(f"no kustomization file in {directory}")


def _build(directory: Path, *, expect_component: bool) -> list[Doc]:
    kustomization = _load_kustomization(directory)
    kind = kustomization.get("kind", "Kustomization")
    if expect_component != (kind == "Component"):
        raise UnsupportedFeature(f"{directory}: kind {kind} used where it is not allowed")
    docs: list[Doc] = []
    for entry in kustomization.get("resources") or []:
        docs.extend(_load_resource(directory / entry))
    for entry in kustomization.get("components") or []:
        docs = _apply_component(directory / entry, docs)
    return _transform(directory, kustomization, docs)


def _apply_component(directory: Path, docs: list[Doc]) -> list[Doc]:
    component = _load_kustomization(directory)
    if component.get("kind") != "Component":
        raise UnsupportedFeature(f"{directory}: listed under components but not a Component")
    if component.get("components"):
        raise UnsupportedFeature(f"{directory}: nested components are not supported")
    docs = list(docs)
    for entry in component.get("resources") or []:
        docs.extend(_load_resource(directory / entry))
    return _transform(directory, component, docs)


def _load_resource(path: Path) -> list[Doc]:
    if path.is_dir():
        return _build(path, expect_component=False)
    if not path.is_file():
        raise FileNotFoundError(f"resource {path} does not exist")
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _transform(directory: Path, kustomization: dict[str, Any], docs: list[Doc]) -> list[Doc]:
    docs = [copy.deepcopy(doc) for doc in docs]
    namespace = kustomization.get("namespace")
    if namespace:
        for doc in docs:
            if doc.get("kind") not in CLUSTER_SCOPED_KINDS:
                doc.setdefault("metadata", {})["namespace"] = namespace
    for patch in kustomization.get("patches") or []:
        docs = _apply_patch(directory, patch, docs)
    for image in kustomization.get("images") or []:
        for doc in docs:
            _rewrite_images(doc, image)
    return docs


# Patches ------------------------------------------------------------------------------


def _apply_patch(directory: Path, entry: dict[str, Any], docs: list[Doc]) -> list[Doc]:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown:
        raise UnsupportedFeature(f"patch field(s) {sorted(unknown)} not supported")
    if ("path" in entry) == ("patch" in entry):
        raise UnsupportedFeature("a patch needs exactly one of `path` or `patch`")
    text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
    body = yaml.safe_load(text)
    target = entry.get("target")
    if isinstance(body, list):
        if target is None:
            raise UnsupportedFeature("a JSON 6902 patch needs a target")
        matched = [doc for doc in docs if _matches(doc, target)]
        if not matched:
            raise PatchError(f"patch target {target} matches no resource")
        for doc in matched:
            _json6902(doc, body)
        return docs
    if isinstance(body, dict):
        _reject_lists(body)
        if target is None:
            target = {
                "kind": body.get("kind"),
                "name": re.escape(str((body.get("metadata") or {}).get("name", ""))),
            }
        matched = [doc for doc in docs if _matches(doc, target)]
        if not matched:
            raise PatchError(f"patch target {target} matches no resource")
        patch_body = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
        if "metadata" in patch_body:
            patch_body["metadata"] = {
                k: v for k, v in patch_body["metadata"].items() if k not in ("name", "namespace")
            }
        for doc in matched:
            _merge_maps(doc, patch_body)
        return docs
    raise UnsupportedFeature(f"patch of type {type(body).__name__} not supported")


def _matches(doc: Doc, target: dict[str, Any]) -> bool:
    unknown = set(target) - {"kind", "name", "namespace"}
    if unknown:
        raise UnsupportedFeature(f"patch target field(s) {sorted(unknown)} not supported")
    metadata = doc.get("metadata") or {}
    if "kind" in target and doc.get("kind") != target["kind"]:
        return False
    if "name" in target and not re.fullmatch(target["name"], str(metadata.get("name", ""))):
        return False
    return not ("namespace" in target and metadata.get("namespace") != target["namespace"])


def _reject_lists(value: Any) -> None:
    if isinstance(value, list):
        raise UnsupportedFeature(
            "strategic-merge patches containing lists are not supported (kustomize may merge "
            "them by key); use a JSON 6902 patch"
        )
    if isinstance(value, dict):
        for item in value.values():
            _reject_lists(item)


def _merge_maps(doc: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            doc.pop(key, None)
        elif isinstance(value, dict) and isinstance(doc.get(key), dict):
            _merge_maps(doc[key], value)
        else:
            doc[key] = copy.deepcopy(value)


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON pointer {path!r} must start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for part in parts[:-1]:
        node = _child(node, part, path)
    return node


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, dict):
        if part not in node:
            raise PatchError(f"path {path}: no key {part!r}")
        return node[part]
    if isinstance(node, list):
        index = _index(node, part, path)
        if index >= len(node):
            raise PatchError(f"path {path}: index {index} out of range")
        return node[index]
    raise PatchError(f"path {path}: cannot descend into {type(node).__name__}")


def _index(node: list[Any], part: str, path: str) -> int:
    if not part.isdigit():
        raise PatchError(f"path {path}: {part!r} is not a list index")
    return int(part)


def _json6902(doc: Doc, ops: list[dict[str, Any]]) -> None:
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        parts = _pointer(path)
        if not parts:
            raise UnsupportedFeature("JSON 6902 operations on the whole document")
        parent = _parent(doc, parts, path)
        last = parts[-1]
        if kind == "add":
            value = copy.deepcopy(op["value"])
            if isinstance(parent, dict):
                parent[last] = value
            elif isinstance(parent, list):
                if last == "-":
                    parent.append(value)
                else:
                    index = _index(parent, last, path)
                    if index > len(parent):
                        raise PatchError(f"path {path}: index {index} out of range")
                    parent.insert(index, value)
            else:
                raise PatchError(f"path {path}: parent is not a container")
        elif kind in ("replace", "remove", "test"):
            current = _child(parent, last, path)  # raises if missing, as RFC 6902 requires
            if kind == "test":
                if current != op["value"]:
                    raise PatchError(f"test at {path} failed: {current!r} != {op['value']!r}")
            elif kind == "remove":
                if isinstance(parent, dict):
                    del parent[last]
                else:
                    del parent[_index(parent, last, path)]
            elif isinstance(parent, dict):
                parent[last] = copy.deepcopy(op["value"])
            else:
                parent[_index(parent, last, path)] = copy.deepcopy(op["value"])
        else:
            raise UnsupportedFeature(f"JSON 6902 op {kind!r} not supported")


# Images -------------------------------------------------------------------------------


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """`registry:5000/a/b:tag@sha256:x` -> (`registry:5000/a/b`, `tag`, `sha256:x`)."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    colon = image.rfind(":")
    if colon > image.rfind("/"):
        image, tag = image[:colon], image[colon + 1 :]
    return image, tag, digest


def _rewrite_images(node: Any, rule: dict[str, Any]) -> None:
    unknown = set(rule) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise UnsupportedFeature(f"images field(s) {sorted(unknown)} not supported")
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        container["image"] = _new_image(container["image"], rule)
            _rewrite_images(value, rule)
    elif isinstance(node, list):
        for item in node:
            _rewrite_images(item, rule)


def _new_image(image: str, rule: dict[str, Any]) -> str:
    name, tag, digest = split_image(image)
    if name != rule["name"]:
        return image
    name = rule.get("newName", name)
    if "digest" in rule:
        return f"{name}@{rule['digest']}"
    tag = rule.get("newTag", tag)
    result = f"{name}:{tag}" if tag else name
    return f"{result}@{digest}" if digest and "newTag" not in rule else result
