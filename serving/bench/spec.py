"""`kvpilot bench spec`: n-gram speculative decoding against plain decoding, in the same run.

The workload is the one prompt lookup is for: outputs that copy from the prompt. Each prompt asks
the (instruct) model to repeat a paragraph of the shipped English text or to return a function of
kvpilot's own source with one name changed, through the model's chat template. Decoding is
greedy, so both modes produce the same tokens (the table says whether they did) and the
speed-up is time for time. Batch 1 runs the prompts one after another; batch B runs B at once;
the two modes take turns on each batch, in one engine without prefix caching.
"""

import argparse
import inspect
import time
from dataclasses import dataclass

from kvpilot.serving.bench.machine import describe_machine, format_machine
from kvpilot.serving.bench.workload import read_text
from kvpilot.serving.sampling_params import SamplingParams


def copy_prompts(num_prompts: int, tokenizer, chat_template: str | None) -> list[str]:
    """Half summarisation-style (repeat a paragraph), half code edits (rename in a function)."""
    from kvpilot.serving.engine import block_pool, kv_cache_manager, scheduler

    paragraphs = [p.strip() for p in read_text().split("\n\n") if 400 <= len(p.strip()) <= 900]
    functions = [
        inspect.getsource(f)
        for f in (
            scheduler.Scheduler.update_from_output,
            scheduler.Scheduler.finish_request,
            kv_cache_manager.KVCacheManager.allocate_slots,
            kv_cache_manager.KVCacheManager.free,
            block_pool.BlockPool.get_new_blocks,
            block_pool.BlockPool.free_blocks,
            block_pool.FreeKVCacheBlockQueue.append,
            block_pool.BlockPool.cache_full_block,
        )
    ]
    tasks = []
    for i in range(num_prompts):
        if i % 2 == 0:
            text = paragraphs[(i // 2) % len(paragraphs)]
            tasks.append(f"Repeat the following paragraph word for word.\n\n{text}")
        else:
            code = functions[(i // 2) % len(functions)]
            tasks.append(
                f"Rename `self` to `this` in this Python method and return the whole method.\n\n{code}"
            )
    if chat_template is None:
        return tasks
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": task}],
            chat_template=chat_template,
            add_generation_prompt=True,
            tokenize=False,
        )
        for task in tasks
    ]


@dataclass
class Run:
    seconds: float
    outputs: list[list[int]]
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.outputs))


def run(llm, prompts: list[str], max_tokens: int, speculative: bool) -> Run:
    """One batch of prompts, greedy, with or without the engine's drafts; counters are this run's.

    One engine serves both modes (no second copy of the weights): without drafts it is exactly
    the plain engine, since the proposer is the only thing speculative decoding adds to a step."""
    engine = llm.llm_engine
    proposer = engine.proposer
    if not speculative:
        engine.proposer = None
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    before = engine.get_stats()
    started = time.perf_counter()
    try:
        outputs = [out.outputs[0].token_ids for out in llm.generate(prompts, params)]
    finally:
        engine.proposer = proposer
    seconds = time.perf_counter() - started
    after = engine.get_stats()
    return Run(
        seconds,
        outputs,
        after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens,
        after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens,
    )


def compare(llm, prompts: list[str], batch: int, max_tokens: int) -> tuple[Run, Run]:
    """(plain, speculative) on the same batches, alternating which goes first (a machine whose
    load drifts then weighs on both alike)."""
    totals = {False: Run(0.0, []), True: Run(0.0, [])}
    for i, start in enumerate(range(0, len(prompts), batch)):
        for speculative in (False, True) if i % 2 == 0 else (True, False):
            result = run(llm, prompts[start : start + batch], max_tokens, speculative)
            total = totals[speculative]
            total.seconds += result.seconds
            total.outputs += result.outputs
            total.num_draft_tokens += result.num_draft_tokens
            total.num_accepted_tokens += result.num_accepted_tokens
    return totals[False], totals[True]


def format_row(batch: int, plain: Run, spec: Run) -> str:
    acceptance = spec.num_accepted_tokens / spec.num_draft_tokens if spec.num_draft_tokens else 0.0
    return (
        f"{batch:>5} {len(plain.outputs):>7} {plain.num_tokens:>7} {plain.num_tokens / plain.seconds:>11.1f} "
        f"{spec.num_tokens / spec.seconds:>10.1f} {plain.seconds / spec.seconds:>8.2f}x "
        f"{acceptance:>10.0%} {'yes' if spec.outputs == plain.outputs else 'NO':>9}"
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "spec", help="n-gram speculative decoding vs plain decoding on copy-heavy prompts"
    )
    parser.add_argument("--model", default=None, help="checkpoint directory or .gguf file (default: SmolLM2)")
    parser.add_argument("--speculative-ngram", type=int, default=2, metavar="N")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    parser.add_argument("--num-prompts", type=int, default=16, help="prompts per batch size > 1")
    parser.add_argument("--num-prompts-batch-1", type=int, default=4, help="prompts run one by one")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.set_defaults(run=main)
    return parser


def main(args: argparse.Namespace) -> int:
    from kvpilot.serving import LLM
    from kvpilot.serving.default_model import default_model_path

    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise SystemExit(
            f"kvpilot bench spec: error: --batch-sizes: expected integers, got {args.batch_sizes!r}"
        ) from None
    model = str(args.model or default_model_path())
    # No prefix caching: the second mode would otherwise find the first one's prompts cached.
    llm = LLM(
        model=model,
        num_kv_blocks=512,
        max_num_seqs=max(batch_sizes),
        max_num_batched_tokens=1024,
        enable_prefix_caching=False,
        speculative_ngram=args.speculative_ngram,
        num_speculative_tokens=args.num_speculative_tokens,
    )
    num_prompts = max(args.num_prompts, args.num_prompts_batch_1)
    prompts = copy_prompts(num_prompts, llm.get_tokenizer(), llm.llm_engine.chat_template)
    print(format_machine(describe_machine()))
    print(
        f"{model}: greedy, max_tokens {args.max_tokens}, n-gram {args.speculative_ngram}, "
        f"{args.num_speculative_tokens} draft tokens"
    )
    print(f"{'batch':>5} {'prompts':>7} {'tokens':>7} {'plain tok/s':>11} {'spec tok/s':>10} {'speed-up':>9} "
          f"{'accepted':>10} {'identical':>9}")  # fmt: skip
    compare(llm, prompts[:1], 1, 8)  # warm-up: first-call costs out of the measurements
    for batch in batch_sizes:
        chosen = prompts[: args.num_prompts_batch_1 if batch == 1 else args.num_prompts]
        print(format_row(batch, *compare(llm, chosen, batch, args.max_tokens)), flush=True)
    return 0
