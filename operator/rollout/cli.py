"""`kvpilot rollout status|promote|abort|history NAME [-n NAMESPACE]` (kubeconfig, like kubectl).

Read commands print `status.rollout` and `status.revisions`. promote and abort write an
annotation on the InferenceService that names the revision (and step) and the rollout (its
startedAt) they were given for; the operator acts on it, and a stale one (the rollout moved on,
or a later rollout of the same revision) does nothing. Nothing is kept
anywhere but the object.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

ACTIVE_PHASES = ("Progressing", "Paused")


class CommandError(Exception):
    """A message for the user; the command exits 1."""


def _api(args: argparse.Namespace) -> Any:
    import kubernetes

    try:
        kubernetes.config.load_kube_config(context=args.context)
    except (kubernetes.config.ConfigException, FileNotFoundError) as exc:
        raise CommandError(f"no usable kubeconfig: {exc}") from exc
    return kubernetes.client.CustomObjectsApi()


def _namespace(args: argparse.Namespace) -> str:
    if args.namespace:
        return args.namespace
    import kubernetes

    try:
        _, context = kubernetes.config.list_kube_config_contexts()
    except (kubernetes.config.ConfigException, FileNotFoundError):
        return "default"
    return (context or {}).get("context", {}).get("namespace") or "default"


def _get(args: argparse.Namespace) -> tuple[Any, str, dict[str, Any]]:
    from kubernetes.client.exceptions import ApiException
    from kvpilot.operator.api import GROUP, PLURAL, VERSION

    api, namespace = _api(args), _namespace(args)
    try:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, args.name)
    except ApiException as exc:
        if exc.status == 404:
            raise CommandError(f"InferenceService {namespace}/{args.name} not found") from exc
        raise CommandError(
            f"reading InferenceService {namespace}/{args.name}: HTTP {exc.status} {exc.reason}"
        ) from exc
    return api, namespace, obj


def _rollout(obj: dict[str, Any]) -> dict[str, Any]:
    rollout = (obj.get("status") or {}).get("rollout")
    if not rollout:
        name = obj["metadata"]["name"]
        raise CommandError(f"InferenceService {name} has no rollout status yet (is the operator running?)")
    return rollout


def _annotate(args: argparse.Namespace, api: Any, namespace: str, key: str, value: str) -> None:
    from kubernetes.client.exceptions import ApiException
    from kvpilot.operator.api import GROUP, PLURAL, VERSION

    body = {"metadata": {"annotations": {key: value}}}
    try:
        api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, args.name, body)
    except ApiException as exc:
        raise CommandError(f"annotating {namespace}/{args.name}: HTTP {exc.status} {exc.reason}") from exc


def format_status(obj: dict[str, Any]) -> str:
    rollout = _rollout(obj)
    meta = obj["metadata"]
    lines = [
        f"Name:       {meta['name']} ({meta.get('namespace', 'default')})",
        f"Strategy:   {rollout.get('strategy', 'Rolling')}",
        f"Phase:      {rollout['phase']} ({rollout.get('reason', '')}): {rollout.get('message', '')}",
        f"Revision:   {rollout['revision']} (weight {rollout.get('canaryWeight', 0)}%"
        + (f", step {rollout['step'] + 1}" if rollout.get("step") is not None else "")
        + ")",
        f"Stable:     {rollout['stableRevision']}",
        f"Capacity:   {rollout.get('capacityMode', 'Surge')}"
        + (f" ({rollout['capacityReason']})" if rollout.get("capacityReason") else ""),
    ]
    analysis = rollout.get("lastAnalysis")
    if analysis:
        verdict = {True: "passed", False: "FAILED", None: "inconclusive"}[analysis.get("passed")]
        lines.append(f"Analysis:   {analysis['time']} {verdict}: {analysis.get('message', '')}")
    rows = [("REVISION", "HASH", "PHASE", "WEIGHT", "READY", "MODEL", "QUANTIZATION", "IMAGE")]
    for revision in (obj.get("status") or {}).get("revisions") or []:
        rows.append(
            (
                revision["name"],
                revision["hash"],
                revision["phase"],
                f"{revision.get('weight', 0)}%",
                f"{revision.get('readyReplicas', 0)}/{revision.get('replicas', 0)}",
                revision.get("model", ""),
                revision.get("quantization", ""),
                revision.get("image", ""),
            )
        )
    return "\n".join([*lines, "", _table(rows)]) + "\n"


def format_history(obj: dict[str, Any]) -> str:
    rows = [("TIME", "PHASE", "REVISION", "REASON", "MESSAGE")]
    for entry in _rollout(obj).get("history") or []:
        rows.append(
            (entry["time"], entry["phase"], entry["revision"], entry["reason"], entry.get("message", ""))
        )
    return _table(rows) + "\n"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    )


def _status(args: argparse.Namespace) -> str:
    return format_status(_get(args)[2])


def _history(args: argparse.Namespace) -> str:
    return format_history(_get(args)[2])


def _started_at(rollout: dict[str, Any]) -> str:
    """The rollout's start time, which scopes a command to it (state.Commands.for_rollout)."""
    if not rollout.get("startedAt"):
        raise CommandError("status.rollout has no startedAt (an operator older than this CLI?)")
    return rollout["startedAt"]


def _promote(args: argparse.Namespace) -> str:
    from kvpilot.operator.rollout.state import PROMOTE_ANNOTATION, command_value

    api, namespace, obj = _get(args)
    rollout = _rollout(obj)
    if rollout["phase"] not in ACTIVE_PHASES:
        raise CommandError(f"nothing to promote: the rollout of {args.name} is {rollout['phase']}")
    target = "full" if args.full else str(rollout.get("step") or 0)
    value = command_value(f"{rollout['revision']}/{target}", _started_at(rollout))
    _annotate(args, api, namespace, PROMOTE_ANNOTATION, value)
    what = "to 100%" if args.full else f"past step {int(target) + 1}"
    return f"promote of revision {rollout['revision']} {what} requested ({PROMOTE_ANNOTATION}={value})\n"


def _abort(args: argparse.Namespace) -> str:
    from kvpilot.operator.rollout.state import ABORT_ANNOTATION, command_value

    api, namespace, obj = _get(args)
    rollout = _rollout(obj)
    if rollout["phase"] not in (*ACTIVE_PHASES, "Failed"):
        raise CommandError(f"nothing to abort: the rollout of {args.name} is {rollout['phase']}")
    value = command_value(rollout["revision"], _started_at(rollout))
    _annotate(args, api, namespace, ABORT_ANNOTATION, value)
    return (
        f"abort of revision {rollout['revision']} requested ({ABORT_ANNOTATION}): traffic goes back to "
        f"{rollout['stableRevision']} until the spec changes\n"
    )


def _run(args: argparse.Namespace) -> int:
    try:
        sys.stdout.write(args.action(args))
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    rollout = subparsers.add_parser("rollout", help="show and steer the rollout of an InferenceService")
    actions = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    for name, action, help_text in (
        ("status", _status, "phase, step, weights, last analysis and revisions"),
        ("history", _history, "the last transitions, with their reasons"),
        ("promote", _promote, "finish the current step's pause (with --full: go to 100%%)"),
        ("abort", _abort, "send all traffic back to the stable revision and scale the new one to 0"),
    ):
        parser = actions.add_parser(name, help=help_text)
        parser.add_argument("name", help="InferenceService name")
        parser.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
        parser.add_argument("--context", help="kubeconfig context (default: the current one)")
        if name == "promote":
            parser.add_argument("--full", action="store_true", help="skip every remaining step")
        parser.set_defaults(run=_run, action=action)
