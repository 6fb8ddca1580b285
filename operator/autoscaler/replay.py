"""`kvpilot autoscale replay`: the autoscaler's own decision function over recorded samples, to tune
a policy on last week's metrics before applying it.

Open-loop: each sample's ready replicas are what was recorded, not what the replayed decisions
would have produced; the replay does not model how replicas (or the load) respond to scaling.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kvpilot.operator.autoscaler.decision import State, decide
from kvpilot.operator.autoscaler.policy import Policy, Sample
from pydantic import BaseModel, ConfigDict, Field, ValidationError

HELP = """Replay recorded metrics through the autoscaler's decision function and print its decisions.

Samples: one JSON object per line, {"t": SECONDS, "ready_replicas": N, "running": R, "waiting": W,
"kv_cache_usage": U, "queued": Q}: running and waiting summed over the ready pods, kv_cache_usage
their mean, queued the router's queued requests; a missing key is a value that was not measured.

Open-loop: the recorded ready_replicas and load are replayed as they were; the replay does not model
how replicas (or the load) would have responded to these decisions."""


class RecordedSample(BaseModel):
    """One line of the samples file."""

    model_config = ConfigDict(extra="forbid")

    t: float
    ready_replicas: int = Field(ge=0)
    running: float | None = Field(default=None, ge=0)
    waiting: float | None = Field(default=None, ge=0)
    kv_cache_usage: float | None = Field(default=None, ge=0, le=1)
    queued: float | None = Field(default=None, ge=0)

    def sample(self) -> Sample:
        return Sample(**self.model_dump())


@dataclass(frozen=True)
class Step:
    """The decision at one sample."""

    t: float
    before: int
    after: int
    mode: str
    value: float | None
    reason: str


def replay(policy: Policy, samples: Iterable[Sample]) -> list[Step]:
    """One Step per sample, the count starting at the first sample's ready replicas (within bounds)."""
    steps: list[Step] = []
    window: deque[Sample] = deque()
    current, state = 0, None
    for sample in samples:
        if state is None:
            current = min(max(sample.ready_replicas, policy.min_replicas), policy.max_replicas)
            state = State.start(sample.t, current)
        window.append(sample)
        while window[0].t <= sample.t - policy.stable_window:
            window.popleft()
        decision = decide(policy, list(window), current, sample.t, state)
        steps.append(
            Step(sample.t, current, decision.desired, decision.mode, decision.value, decision.reason)
        )
        current, state = decision.desired, decision.state
    return steps


def read_samples(path: str) -> list[Sample]:
    """The samples file, in time order; ValueError names the line that is wrong."""
    samples = []
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            samples.append(RecordedSample.model_validate_json(line).sample())
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(f"{path}:{number}: {problems}") from None
    if any(b.t < a.t for a, b in itertools.pairwise(samples)):
        raise ValueError(f"{path}: samples must be in time order (t ascending)")
    return samples


def read_policy(path: str) -> Policy:
    """spec.autoscaling of the (first) InferenceService in the manifest."""
    import yaml
    from kvpilot.operator.api import API_VERSION, KIND, InferenceService
    from kvpilot.operator.reconciler import describe_validation_error

    for body in yaml.safe_load_all(Path(path).read_text()):
        if body and (body.get("apiVersion"), body.get("kind")) == (API_VERSION, KIND):
            try:
                isvc = InferenceService.from_body(body)
            except ValidationError as exc:
                raise ValueError(f"{path}: {describe_validation_error(exc)}") from None
            if isvc.spec.autoscaling is None:
                raise ValueError(f"{path}: spec.autoscaling is not set: there is no policy to replay")
            return Policy.from_spec(isvc.spec.autoscaling)
    raise ValueError(f"{path}: no {KIND} ({API_VERSION}) in it")


def plot(steps: list[Step], samples: list[Sample], policy: Policy, path: str) -> None:
    """Replicas (desired, recorded ready), the metric per replica and the target, panic shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = samples[0].t
    times = [s.t - t0 for s in samples]
    figure, (replicas, metric) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    replicas.step(times, [s.after for s in steps], where="post", label="desired (replayed)", color="C0")
    replicas.step(times, [s.ready_replicas for s in samples], ":", where="post", label="ready (recorded)",
                  color="C1")  # fmt: skip
    replicas.set_ylabel("replicas")
    replicas.yaxis.get_major_locator().set_params(integer=True)
    nan = float("nan")
    totals = [s.total(policy.metric) for s in samples]
    metric.plot(times, [nan if v is None else v for v in totals], color="C7", linewidth=0.8,
                label=f"{policy.metric}, all replicas (recorded)")  # fmt: skip
    metric.plot(times, [nan if s.value is None else s.value for s in steps], color="C2",
                label=f"per replica, {policy.stable_window:g}s average")  # fmt: skip
    metric.axhline(policy.target, linestyle="--", color="grey", label=f"target {policy.target:g}")
    metric.set_ylabel(policy.metric)
    metric.set_xlabel("seconds")
    for axes in (replicas, metric):
        for step, t in zip(steps, times, strict=True):
            if step.mode == "panic":
                axes.axvspan(t - 1, t + 1, color="red", alpha=0.08, linewidth=0)
        axes.legend(loc="upper left", fontsize=8)
    replicas.set_title("kvpilot autoscale replay (open-loop; red: panic mode)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _run(args: argparse.Namespace) -> int:
    try:
        policy = read_policy(args.filename)
        samples = read_samples(args.metrics)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not samples:
        print(f"error: {args.metrics}: no samples", file=sys.stderr)
        return 2
    steps = replay(policy, samples)
    changes = [s for s in steps if s.after != s.before]
    for step in changes:
        if args.json:
            line = {
                "t": step.t,
                "from": step.before,
                "to": step.after,
                "mode": step.mode,
                "reason": step.reason,
            }
            print(json.dumps(line))
        else:
            value = "-" if step.value is None else f"{step.value:.3g}"
            change = f"{step.before:>3} -> {step.after:<3}"
            print(f"t={step.t:<12.1f} {change} {step.mode:<6} {value:>6}  {step.reason}")
    final = {"t": steps[-1].t, "desired": steps[-1].after}
    print(json.dumps(final) if args.json else f"final: {final['desired']} replicas at t={final['t']:.1f}")
    if args.plot:
        try:
            plot(steps, samples, policy, args.plot)
        except ImportError:
            print("error: --plot needs matplotlib: pip install 'kvpilot[bench]'", file=sys.stderr)
            return 2
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    autoscale = subparsers.add_parser("autoscale", help="kvpilot's autoscaler offline")
    commands = autoscale.add_subparsers(dest="autoscale_command", required=True, metavar="COMMAND")
    parser = commands.add_parser(
        "replay",
        help="replay recorded metrics through the decision function (open-loop)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-f", "--filename", required=True, help="InferenceService manifest (its spec.autoscaling)"
    )
    parser.add_argument("--metrics", required=True, help="samples, one JSON object per line ('-': stdin)")
    parser.add_argument("--json", action="store_true", help="one JSON line per change, then the final count")
    parser.add_argument("--plot", metavar="PNG", help="draw the timeline (needs matplotlib, the bench extra)")
    parser.set_defaults(run=_run)
