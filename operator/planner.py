"""The pure planner: desired children vs observed children -> what to create, update and delete.

A child needs an update when its spec hash changed (the InferenceService changed) or when a
field the operator owns drifted (someone edited it). Owned fields are exactly the fields of
the desired object; anything else on the observed object (server defaults, fields other
controllers or people set) is left alone. Values the API server canonicalises (resource
quantities) are compared by value, and empty values it omits match their absence, so a
reconcile of an unchanged spec never writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubernetes.utils.quantity import parse_quantity
from kvpilot.operator.labels import SPEC_HASH_ANNOTATION

ChildKey = tuple[str, str]  # (kind, name)

_QUANTITY_KEYS = {"requests", "limits"}  # maps whose values are resource.Quantity
_QUANTITY_FIELDS = {"sizeLimit", "averageValue"}  # an HPA's target 1000 is stored as 1k
# Go's omitempty: the API server drops an empty string, list or map (an env var's value: "").
_OMITTED_WHEN_EMPTY = ("", [], {})


# Kinds whose spec is immutable once created (a Job's template): created, never updated; what
# matters (the model and revision) is in the name, so a change is a new object.
CREATE_ONLY_KINDS = {"Job"}
# Lists the API server merges by key under server-side apply: kind -> (path, key fields). An
# entry someone else added or re-keyed (a Service port edited by hand from 80 to 8080, still
# named http) would stay beside the operator's and make every apply fail with 422 (duplicate
# port name); the planner replaces such a list with a merge patch before applying.
KEYED_LISTS = {"Service": (("spec", "ports"), ("port", "protocol"))}


@dataclass(frozen=True)
class Plan:
    create: list[dict[str, Any]] = field(default_factory=list)
    update: list[dict[str, Any]] = field(default_factory=list)  # desired objects to apply
    delete: list[dict[str, Any]] = field(default_factory=list)  # observed objects to remove
    reset: list[dict[str, Any]] = field(default_factory=list)  # merge patches sent before the applies

    @property
    def is_empty(self) -> bool:
        return not (self.create or self.update or self.delete or self.reset)


def key_of(obj: dict[str, Any]) -> ChildKey:
    return obj["kind"], obj["metadata"]["name"]


def _same_quantity(desired: Any, observed: Any) -> bool:
    try:
        return parse_quantity(desired) == parse_quantity(observed)
    except (ValueError, TypeError):  # not a quantity (or absent)
        return False


def drifted_fields(desired: Any, observed: Any, path: str = "", quantity: bool = False) -> list[str]:
    """Dotted paths where observed differs from desired, looking only at desired's fields."""
    if observed is None and desired in _OMITTED_WHEN_EMPTY:
        return []
    if isinstance(desired, dict):
        if not isinstance(observed, dict):
            return [path or "."]
        drifts: list[str] = []
        for name, value in desired.items():
            child_path = f"{path}.{name}" if path else name
            child_quantity = quantity or name in _QUANTITY_KEYS or name in _QUANTITY_FIELDS
            drifts += drifted_fields(value, observed.get(name), child_path, child_quantity)
        return drifts
    if isinstance(desired, list):
        if not isinstance(observed, list) or len(observed) != len(desired):
            return [path]
        drifts = []
        for index, (want, have) in enumerate(zip(desired, observed, strict=True)):
            drifts += drifted_fields(want, have, f"{path}[{index}]", quantity)
        return drifts
    if desired == observed or (quantity and _same_quantity(desired, observed)):
        return []
    return [path]


def needs_update(desired: dict[str, Any], observed: dict[str, Any]) -> bool:
    want = desired["metadata"].get("annotations", {}).get(SPEC_HASH_ANNOTATION)
    have = (observed.get("metadata", {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
    return want != have or bool(drifted_fields(desired, observed))


def _dig(obj: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        obj = (obj or {}).get(part)
    return obj


def list_reset(desired: dict[str, Any], observed: dict[str, Any]) -> dict[str, Any] | None:
    """A merge patch replacing a keyed list of `observed` by desired's, when observed has entries
    under keys the operator does not set (see KEYED_LISTS); None otherwise."""
    if desired["kind"] not in KEYED_LISTS:
        return None
    path, keys = KEYED_LISTS[desired["kind"]]
    wanted = _dig(desired, path) or []
    defaults = {"protocol": "TCP"}

    def key(entry: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(entry.get(k, defaults.get(k)) for k in keys)

    if {key(entry) for entry in _dig(observed, path) or []} <= {key(entry) for entry in wanted}:
        return None
    patch: dict[str, Any] = wanted
    for part in reversed(path):
        patch = {part: patch}
    metadata = desired["metadata"]
    return {
        "apiVersion": desired["apiVersion"],
        "kind": desired["kind"],
        "metadata": {"name": metadata["name"], "namespace": metadata["namespace"]},
        **patch,
    }


def plan(desired: list[dict[str, Any]], observed: list[dict[str, Any]]) -> Plan:
    """Compare by (kind, name); observed must already be filtered to this owner's children."""
    observed_by_key = {key_of(obj): obj for obj in observed}
    desired_keys = {key_of(obj) for obj in desired}
    create = [obj for obj in desired if key_of(obj) not in observed_by_key]
    update = [
        obj
        for obj in desired
        if key_of(obj) in observed_by_key
        and obj["kind"] not in CREATE_ONLY_KINDS
        and needs_update(obj, observed_by_key[key_of(obj)])
    ]
    delete = [obj for key, obj in observed_by_key.items() if key not in desired_keys]
    resets = [list_reset(obj, observed_by_key[key_of(obj)]) for obj in update]
    return Plan(create=create, update=update, delete=delete, reset=[r for r in resets if r])


def replicas_handoff(
    desired: list[dict[str, Any]], observed: list[dict[str, Any]], manager: str
) -> dict[str, int]:
    """Deployments whose replicas `manager` set by server-side apply but no longer sets (autoscaling
    was turned on): name -> the observed count. A field its only owner stops applying is removed,
    which resets the replicas to 1; another manager applying the count first keeps it."""
    wanted = {
        obj["metadata"]["name"]
        for obj in desired
        if obj["kind"] == "Deployment" and "replicas" not in obj["spec"]
    }
    handoff = {}
    for obj in observed:
        name = obj["metadata"]["name"]
        if obj["kind"] != "Deployment" or name not in wanted or "replicas" not in (obj.get("spec") or {}):
            continue
        for entry in obj["metadata"].get("managedFields") or []:
            owned = (entry.get("fieldsV1") or {}).get("f:spec") or {}
            if (
                entry.get("manager") == manager
                and entry.get("operation") == "Apply"
                and "f:replicas" in owned
            ):
                handoff[name] = obj["spec"]["replicas"]
    return handoff
