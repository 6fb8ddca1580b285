"""`kvpilot crd`, `kvpilot render -f isvc.yaml` and `kvpilot operator` (registered in the
`kvpilot` command's table; `python -m kvpilot.operator.cli ...` runs the same commands)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError

if TYPE_CHECKING:
    from kvpilot.operator.defaults import ClusterDefaults


def _crd(args: argparse.Namespace) -> int:
    from kvpilot.operator.crd import render_crd

    text = render_crd()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _render(args: argparse.Namespace) -> int:
    from kvpilot.operator.api import API_VERSION, KIND, InferenceService
    from kvpilot.operator.builders import build_children
    from kvpilot.operator.fit import estimate
    from kvpilot.operator.reconciler import describe_validation_error

    text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
    rendered = []
    for body in yaml.safe_load_all(text):
        if not body:
            continue
        if (body.get("apiVersion"), body.get("kind")) != (API_VERSION, KIND):
            print(f"error: expected apiVersion {API_VERSION}, kind {KIND}", file=sys.stderr)
            return 2
        try:
            isvc = InferenceService.from_body(body)
        except ValidationError as exc:
            name = (body.get("metadata") or {}).get("name", "?")
            print(f"error: InferenceService {name}: {describe_validation_error(exc)}", file=sys.stderr)
            return 2
        fit = estimate(isvc)
        if fit is not None:  # the operator's check, before anything is applied
            name = isvc.metadata.name
            if fit.fits is False:
                print(f"error: InferenceService {name}: {fit.memory_field}: {fit.message()}", file=sys.stderr)
                return 2
            print(
                f"InferenceService {name}: {'GPU memory' if fit.on_gpu else 'memory'} {fit.message()}",
                file=sys.stderr,
            )
        rendered += build_children(isvc)
    sys.stdout.write(yaml.dump_all(rendered, Dumper=_BlockDumper, sort_keys=False))
    return 0


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the router's config in its ConfigMap) as readable `|` blocks."""


def _block_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _block_str)


def _operator(args: argparse.Namespace) -> int:
    import kopf
    import kvpilot.operator.handlers  # noqa: F401  (registers the handlers)

    if args.record_samples:
        from kvpilot.operator.autoscaler.loop import RECORD_ENV

        Path(args.record_samples).mkdir(parents=True, exist_ok=True)
        os.environ[RECORD_ENV] = str(Path(args.record_samples).resolve())
    try:
        defaults = _cluster_defaults(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.update(defaults.to_environ())
    kopf.configure(verbose=args.verbose)
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        liveness_endpoint=args.liveness,
    )
    return 0


# --default-model-cache-<suffix> -> its field of spec.model.cache
_CACHE_FLAGS = {"size": "size", "storage-class": "storageClassName", "access-mode": "accessMode"}


def _cluster_defaults(args: argparse.Namespace) -> ClusterDefaults:
    """The --default-model-cache-* flags, checked as `spec.model.cache` is (an error names the flag)."""
    from kvpilot.operator.api.model import ModelCacheSpec
    from kvpilot.operator.defaults import ClusterDefaults

    given = {
        field: value
        for suffix, field in _CACHE_FLAGS.items()
        if (value := getattr(args, f"default_model_cache_{suffix.replace('-', '_')}")) is not None
    }
    if not given:
        return ClusterDefaults()
    if "size" not in given:
        raise ValueError("--default-model-cache-size is required with any other --default-model-cache-* flag")
    try:
        return ClusterDefaults(ModelCacheSpec.model_validate(given))
    except ValidationError as exc:
        error = exc.errors()[0]
        suffix = next(s for s, field in _CACHE_FLAGS.items() if field == error["loc"][0])
        raise ValueError(f"--default-model-cache-{suffix}: {error['msg']}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    crd = subparsers.add_parser("crd", help="print the InferenceService CRD generated from the API models")
    crd.add_argument("-o", "--output", help="write to this file instead of stdout")
    crd.set_defaults(run=_crd)

    render = subparsers.add_parser(
        "render",
        help="print the objects the operator creates for a manifest (the router with no endpoints yet; "
        "an InferencePool as if the cluster served its CRD)",
    )
    render.add_argument("-f", "--filename", required=True, help="InferenceService manifest(s), '-' for stdin")
    render.set_defaults(run=_render)

    operator = subparsers.add_parser("operator", help="run the InferenceService operator (kopf)")
    operator.add_argument(
        "-n", "--namespace", action="append", help="watch only this namespace (repeatable; default: all)"
    )
    operator.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz", help="kopf liveness endpoint (empty: none)"
    )
    operator.add_argument(
        "--record-samples",
        metavar="DIR",
        help="append the autoscaler's samples to DIR/NAMESPACE_NAME.jsonl (for `kvpilot autoscale replay`)",
    )
    operator.add_argument(
        "--default-model-cache-size",
        metavar="QUANTITY",
        help="cluster-wide spec.model.cache for downloaded models (hf://, s3://, gs://) that set none: "
        "the claim's size, e.g. 200Gi (the chart's modelCache.size)",
    )
    operator.add_argument(
        "--default-model-cache-storage-class",
        metavar="NAME",
        help="its StorageClass (default: the cluster's default class)",
    )
    operator.add_argument(
        "--default-model-cache-access-mode",
        metavar="MODE",
        help="its access mode (default ReadWriteMany)",
    )
    operator.add_argument("-v", "--verbose", action="store_true")
    operator.set_defaults(run=_operator)


if __name__ == "__main__":
    from kvpilot.serving.cli import main

    sys.exit(main())
