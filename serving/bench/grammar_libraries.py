"""Which grammar library to constrain decoding with: xgrammar, llguidance and outlines-core measured
at the default model's vocabulary (49,152 tokens) on this CPU.

`python -m kvpilot.serving.bench.grammar_libraries` (llguidance and outlines-core come with
`pip install 'kvpilot[grammar-bench]'`; a library that is not installed is reported as such).
For each library and grammar: the one-off tokenizer set-up, the compile time, and the cost of one
token's mask (fill the allowed-token bitmask for the next step) over seeded random walks through
the grammar, where every step picks one allowed token uniformly at random (so walks reach the
expensive states, e.g. inside strings, not only the cheap ones a model would favour).
"""

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "tags", "address"],
}
GRAMMARS = {  # name -> (kind, spec)
    "json_schema (person)": ("json", PERSON),
    "json_object (any JSON)": ("json_object", None),
    "regex (ISO date time)": ("regex", r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z"),
}


@dataclass
class Result:
    library: str
    grammar: str
    setup_s: float | None = None
    compile_ms: float | None = None
    mask_us: list[float] | None = None
    note: str = ""


class Matcher:
    """One library's matcher behind three calls: fill the bitmask, accept a token, finished?"""

    def __init__(self, fill: Callable, accept: Callable, done: Callable) -> None:
        self.fill, self.accept, self.done = fill, accept, done


def _xgrammar(tokenizer, vocab_size: int, stop_ids: list[int]):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile_(kind, spec):
        if kind == "json":
            return compiler.compile_json_schema(json.dumps(spec), any_whitespace=False)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        return compiler.compile_regex(spec)

    def matcher(compiled, bitmask):
        m = xgr.GrammarMatcher(compiled)
        return Matcher(lambda: m.fill_next_token_bitmask(bitmask, 0), m.accept_token, m.is_terminated)

    return compile_, matcher, xgr.allocate_token_bitmask(1, vocab_size)


def _llguidance(tokenizer, vocab_size: int, stop_ids: list[int]):
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    lltokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)

    def compile_(kind, spec):
        if kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec)
        elif kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
        else:
            grammar = llguidance.LLMatcher.grammar_from_regex(spec)
        matcher = llguidance.LLMatcher(lltokenizer, grammar)  # compiles here
        if matcher.get_error():
            raise ValueError(matcher.get_error())
        return grammar

    def matcher(grammar, bitmask):
        m = llguidance.LLMatcher(lltokenizer, grammar)
        return Matcher(lambda: llt.fill_next_token_bitmask(m, bitmask, 0), m.consume_token, m.is_stopped)

    return compile_, matcher, llt.allocate_token_bitmask(1, vocab_size)


def _outlines_core(tokenizer, vocab_size: int, stop_ids: list[int]):
    import outlines_core
    import outlines_core.kernels.torch as okt
    from outlines_core.json_schema import build_regex_from_schema

    byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokens: dict[bytes, list[int]] = {}
    for token_id in range(len(tokenizer)):
        if token_id in stop_ids:
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        try:
            key = bytes(byte_of[c] for c in token)
        except KeyError:  # an added token that is not byte-level encoded
            key = token.encode()
        tokens.setdefault(key, []).append(token_id)
    vocabulary = outlines_core.Vocabulary(stop_ids[0], tokens)

    def compile_(kind, spec):
        if kind == "json_object":
            raise NotImplementedError("regular languages only: no recursive (any-depth) JSON")
        regex = build_regex_from_schema(json.dumps(spec)) if kind == "json" else spec
        return outlines_core.Index(regex, vocabulary)

    def matcher(index, bitmask):
        guide = outlines_core.Guide(index)
        return Matcher(lambda: okt.fill_next_token_bitmask(guide, bitmask), guide.advance, guide.is_finished)

    return compile_, matcher, okt.allocate_token_bitmask(vocab_size)


LIBRARIES = {"xgrammar": _xgrammar, "llguidance": _llguidance, "outlines-core": _outlines_core}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: which character stands for each byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _allowed(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    bits = np.unpackbits(bitmask.reshape(-1).numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


def measure(
    library: str, tokenizer, vocab_size: int, stop_ids: list[int], walks: int, steps: int
) -> list[Result]:
    try:
        start = time.perf_counter()
        compile_, new_matcher, bitmask = LIBRARIES[library](tokenizer, vocab_size, stop_ids)
        setup_s = time.perf_counter() - start
    except ImportError as exc:
        return [Result(library, "-", note=f"not installed ({exc.name})")]
    results = []
    for name, (kind, spec) in GRAMMARS.items():
        result = Result(library, name, setup_s=setup_s)
        try:
            start = time.perf_counter()
            compiled = compile_(kind, spec)
            result.compile_ms = 1e3 * (time.perf_counter() - start)
        except NotImplementedError as exc:
            result.note = str(exc)
            results.append(result)
            continue
        rng, costs = random.Random(0), []
        for _ in range(walks):
            matcher = new_matcher(compiled, bitmask)
            for _ in range(steps):
                start = time.perf_counter()
                matcher.fill()
                costs.append(1e6 * (time.perf_counter() - start))
                allowed = [t for t in _allowed(bitmask, vocab_size).tolist() if t not in stop_ids]
                if not allowed or matcher.done():
                    break
                if not matcher.accept(rng.choice(allowed)):
                    result.note = "a token its own mask allowed was refused"
                    break
        result.mask_us = costs
        results.append(result)
    return results


def format_results(results: list[Result]) -> str:
    columns = [
        "library",
        "grammar",
        "tokenizer set-up (s)",
        "compile (ms)",
        "mask/token mean / p50 / p99 (µs)",
    ]
    lines = ["| " + " | ".join([*columns, "note"]) + " |", "|---|---|---|---|---|---|"]
    for r in results:
        setup = f"{r.setup_s:.2f}" if r.setup_s is not None else "-"
        compiled = f"{r.compile_ms:.1f}" if r.compile_ms is not None else "-"
        mask = "-"
        if r.mask_us:
            p99 = float(np.percentile(r.mask_us, 99))
            mask = f"{statistics.mean(r.mask_us):.0f} / {statistics.median(r.mask_us):.0f} / {p99:.0f}"
        lines.append(f"| {r.library} | {r.grammar} | {setup} | {compiled} | {mask} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--walks", type=int, default=20, help="random walks per grammar")
    parser.add_argument("--steps", type=int, default=64, help="tokens per walk at most")
    args = parser.parse_args(argv)
    from kvpilot.serving.bench.workload import load_tokenizer

    tokenizer = load_tokenizer()
    vocab_size, stop_ids = len(tokenizer), [tokenizer.eos_token_id]
    torch.set_num_threads(1)
    results = []
    for library in LIBRARIES:
        results += measure(library, tokenizer, vocab_size, stop_ids, args.walks, args.steps)
    print(f"vocabulary: {vocab_size} tokens; one thread; {args.walks} random walks of <= {args.steps} tokens")
    print(format_results(results))


if __name__ == "__main__":
    main()
