"""`kvpilot bench throughput`: offline output-token throughput of kvpilot vs transformers.

A seeded workload of random token-id prompts (`--num-prompts` x `--input-len` tokens, each
generating exactly `--output-len` tokens: greedy, `ignore_eos`) runs through kvpilot's `LLM`
(all prompts at once, continuous batching) and, in the same process, through transformers
`generate` one request at a time, the way a user without a serving engine would. Both load
the same checkpoint directory or .gguf file in float32.
"""

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

from kvpilot.serving.bench.report import SystemResult
from kvpilot.serving.bench.workload import WorkloadRequest, default_model_path


@dataclass(frozen=True)
class ThroughputArgs:
    model: str
    num_prompts: int
    input_len: int
    output_len: int
    seed: int = 0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    num_kv_blocks: int | None = None
    run_hf: bool = True


def random_workload(num_prompts: int, input_len: int, output_len: int, vocab_size: int, seed: int):
    """Prompts of random token ids; the same arguments give the same prompts."""
    rng = random.Random(seed)
    return [
        WorkloadRequest(f"req-{i}", tuple(rng.randrange(vocab_size) for _ in range(input_len)), output_len)
        for i in range(num_prompts)
    ]


def run_kvpilot(llm, requests: list[WorkloadRequest]) -> SystemResult:
    from kvpilot.serving.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate([list(r.prompt_token_ids) for r in requests], params)
    elapsed = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    expected = sum(r.output_len for r in requests)
    if output_tokens != expected:
        raise RuntimeError(f"kvpilot generated {output_tokens} tokens, expected {expected}")
    return SystemResult("fp32", len(requests), output_tokens, elapsed)


def run(args: ThroughputArgs) -> dict[str, SystemResult]:
    from kvpilot.serving.bench.baselines import load_hf_model, run_hf_sequential
    from kvpilot.serving.llm import LLM

    llm = LLM(
        model=args.model,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
    )
    vocab_size = llm.llm_engine.vocab_size
    requests = random_workload(args.num_prompts, args.input_len, args.output_len, vocab_size, args.seed)
    warm_up = random_workload(1, min(args.input_len, 8), 2, vocab_size, args.seed + 1)
    run_kvpilot(llm, warm_up)
    results = {"kvpilot": run_kvpilot(llm, requests)}
    del llm
    if args.run_hf:
        hf_model = load_hf_model(args.model)
        run_hf_sequential(hf_model, warm_up)
        results["transformers"] = run_hf_sequential(hf_model, requests)
    return results


def format_results(results: dict[str, SystemResult]) -> str:
    header = f"{'system':<14}{'requests':>9}{'out tokens':>12}{'seconds':>10}{'tokens/s':>11}"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        lines.append(
            f"{name:<14}{r.num_requests:>9}{r.output_tokens:>12}{r.elapsed_s:>10.2f}{r.output_tokens_per_s:>11.1f}"
        )
    if "transformers" in results:
        ratio = results["kvpilot"].output_tokens_per_s / results["transformers"].output_tokens_per_s
        lines.append(f"{'kvpilot / transformers':<36}{ratio:>10.2f}x")
    return "\n".join(lines)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "throughput", help="offline output-token throughput: kvpilot vs transformers generate (sequential)"
    )
    parser.add_argument("--model", default=None, help="checkpoint directory or .gguf file (default: SmolLM2)")
    parser.add_argument("--num-prompts", type=_positive, default=16)
    parser.add_argument("--input-len", type=_positive, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=_positive, default=64, help="generated tokens per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=_positive, default=64)
    parser.add_argument("--max-num-batched-tokens", type=_positive, default=512)
    parser.add_argument("--num-kv-blocks", type=_positive, default=None)
    parser.add_argument("--no-hf", dest="run_hf", action="store_false", help="skip the transformers run")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    model = str(args.model) if args.model else str(default_model_path())
    if not Path(model).exists():
        raise SystemExit(f"kvpilot bench throughput: error: --model: {model} does not exist")
    options = ThroughputArgs(
        model=model,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        seed=args.seed,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
        run_hf=args.run_hf,
    )
    print(format_results(run(options)))
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number
