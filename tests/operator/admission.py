"""Test support: what kube-apiserver does with a CRD schema at admission, minus the server.

Structural defaulting, then OpenAPI validation (jsonschema, Draft 4 semantics as in
OpenAPI 3.0: boolean exclusiveMinimum), then every `x-kubernetes-validations` CEL rule
evaluated with cel-python on the object it is attached to.
"""

from __future__ import annotations

import copy
from typing import Any

import celpy
import jsonschema
from kvpilot.operator.crd import build_crd


def crd_schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    if isinstance(obj, dict) and schema.get("type") == "object":
        for name, prop in (schema.get("properties") or {}).items():
            if name not in obj and "default" in prop:
                obj[name] = copy.deepcopy(prop["default"])
            if name in obj:
                obj[name] = apply_defaults(prop, obj[name])
    elif isinstance(obj, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in obj]
    return obj


def _cel_errors(schema: dict[str, Any], obj: Any, path: str) -> list[str]:
    errors = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations") or []:
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(obj)}):
            errors.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(obj, dict):
        for name, prop in (schema.get("properties") or {}).items():
            if name in obj:
                errors += _cel_errors(prop, obj[name], f"{path}.{name}")
    elif isinstance(obj, list) and "items" in schema:
        for index, item in enumerate(obj):
            errors += _cel_errors(schema["items"], item, f"{path}[{index}]")
    return errors


def _list_map_errors(schema: dict[str, Any], obj: Any, path: str) -> list[str]:
    """`x-kubernetes-list-type: map`: no two items with the same keys."""
    errors = []
    if isinstance(obj, list) and schema.get("x-kubernetes-list-type") == "map":
        keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in obj]
        errors += [
            f"{path}: duplicate entries for key {key}" for key in sorted(set(keys)) if keys.count(key) > 1
        ]
    if isinstance(obj, dict):
        for name, prop in (schema.get("properties") or {}).items():
            if name in obj:
                errors += _list_map_errors(prop, obj[name], f"{path}.{name}")
    elif isinstance(obj, list) and "items" in schema:
        for index, item in enumerate(obj):
            errors += _list_map_errors(schema["items"], item, f"{path}[{index}]")
    return errors


def admit(manifest: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the defaulted object, the admission errors); no errors means the API server accepts it."""
    schema = crd_schema()
    obj = apply_defaults(schema, copy.deepcopy(manifest))
    validator = jsonschema.Draft4Validator(schema)
    errors = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
    errors += _list_map_errors(schema, obj, "")
    if not errors:
        errors = _cel_errors(schema, obj, "")
    return obj, errors
