"""The throughput report: per-system results, kvpilot's ratios, the roofline; table, JSON and plot."""

import json
from dataclasses import dataclass
from pathlib import Path

# Systems in the order the table lists them.
KVPILOT_FP32 = "kvpilot_fp32"
KVPILOT_BEST = "kvpilot_best"
HF_SEQUENTIAL = "hf_sequential"
HF_STATIC_BATCH = "hf_static_batch"
LLAMA_CPP = "llama_cpp"
SYSTEMS = (KVPILOT_FP32, KVPILOT_BEST, HF_SEQUENTIAL, HF_STATIC_BATCH, LLAMA_CPP)

# ratio name -> (numerator system, denominator system)
RATIOS = {
    "fp32_vs_hf_sequential": (KVPILOT_FP32, HF_SEQUENTIAL),
    "best_vs_hf_sequential": (KVPILOT_BEST, HF_SEQUENTIAL),
    "best_vs_hf_static_batch": (KVPILOT_BEST, HF_STATIC_BATCH),
    "best_vs_llama_cpp": (KVPILOT_BEST, LLAMA_CPP),
}


@dataclass(frozen=True)
class SystemResult:
    """One system's run over (a subset of) the workload."""

    mode: str  # "fp32", "int8", "q4_1", ...
    num_requests: int
    output_tokens: int
    elapsed_s: float

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s


def build_report(
    systems: dict[str, SystemResult], roofline: dict, machine: dict | None = None, details: dict | None = None
) -> dict:
    """The JSON document of a throughput run; systems that did not run and their ratios are absent.

    `roofline` has at least `tokens_per_s` (see `roofline_summary`); `machine` says where it ran
    (`machine.describe_machine`); `details` holds what a run chose and why (e.g. the measured
    candidates for kvpilot's best mode and llama.cpp's configurations)."""
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"systems: unknown names {sorted(unknown)}, expected some of {SYSTEMS}")
    ordered = [name for name in SYSTEMS if name in systems]
    return {
        "systems": {
            name: {
                "output_tokens_per_s": systems[name].output_tokens_per_s,
                "mode": systems[name].mode,
                "num_requests": systems[name].num_requests,
                "output_tokens": systems[name].output_tokens,
                "elapsed_s": systems[name].elapsed_s,
            }
            for name in ordered
        },
        "roofline": roofline,
        "machine": machine or {},
        "details": details or {},
        "ratios": {
            ratio: systems[num].output_tokens_per_s / systems[den].output_tokens_per_s
            for ratio, (num, den) in RATIOS.items()
            if num in systems and den in systems
        },
    }


def format_table(report: dict) -> str:
    """One readable table: tokens/s of each system, its share of the roofline, kvpilot's ratios."""
    roofline = report["roofline"]["tokens_per_s"]
    width = max([10] + [len(entry["mode"]) + 2 for entry in report["systems"].values()])  # mode column
    header = f"{'system':<18}{'mode':<{width}}{'requests':>9}{'out tokens':>12}{'tokens/s':>11}"
    header += f"{'% roofline':>12}"
    lines = [header, "-" * len(header)]
    for name, entry in report["systems"].items():
        rate = entry["output_tokens_per_s"]
        lines.append(
            f"{name:<18}{entry['mode']:<{width}}{entry['num_requests']:>9}{entry['output_tokens']:>12}"
            f"{rate:>11.1f}{100 * rate / roofline:>11.1f}%"
        )
    lines.append(f"{'fp32 roofline':<18}{'fp32':<{width}}{'':>9}{'':>12}{roofline:>11.1f}{100.0:>11.1f}%")
    lines += _roofline_lines(report["roofline"])
    if report["ratios"]:
        lines.append("")
        lines += [f"{ratio:<26}{value:>8.2f}x" for ratio, value in report["ratios"].items()]
    return "\n".join(lines)


def roofline_summary(bound, peaks, engine_linear_flops_per_s: float | None = None) -> dict:
    """The JSON form of a `roofline.RooflineBound` with the peaks it used."""
    return {
        "tokens_per_s": bound.tokens_per_s,
        "seconds": bound.seconds,
        "compute_s": bound.compute_s,
        "memory_s": bound.memory_s,
        "memory_bound_steps": bound.memory_bound_steps,
        "decode_steps": bound.decode_steps,
        "gemm_flops_per_s": peaks.gemm_flops_per_s,
        "memory_bytes_per_s": peaks.memory_bytes_per_s,
        "engine_linear_flops_per_s": engine_linear_flops_per_s,
    }


def _roofline_lines(roofline: dict) -> list[str]:
    if "seconds" not in roofline:
        return []
    lines = [
        "",
        f"roofline: {roofline['seconds']:.1f} s = per step the slower of compute "
        f"({roofline['compute_s']:.1f} s in all) and memory ({roofline['memory_s']:.1f} s in all; "
        f"{roofline['memory_bound_steps']} of {roofline['decode_steps']} decode steps memory-bound)",
        f"peaks: fp32 GEMM {roofline['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s, "
        f"memory {roofline['memory_bytes_per_s'] / 1e9:.1f} GB/s",
    ]
    engine = roofline.get("engine_linear_flops_per_s")
    if engine:
        lines.append(f"kvpilot fp32 linears: {engine / 1e9:.1f} GFLOP/s (must not exceed the GEMM peak)")
    return lines


def write_json(report: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def plot_concurrency(curves: dict[str, dict[int, float]], path: Path, title: str = "") -> None:
    """Output tokens/s vs concurrency, one line per system (needs the `bench` extra: matplotlib)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'kvpilot[bench]'") from exc
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        concurrencies = sorted(points)
        ax.plot(concurrencies, [points[c] for c in concurrencies], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (sequences at once)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title or "Throughput vs concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
