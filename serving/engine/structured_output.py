"""Grammar-constrained decoding with xgrammar: compile once per spec, one matcher per sequence.

Why xgrammar (measured at the default model's 49,152-token vocabulary, see README "Structured
outputs"): the cheapest per-token mask of the three libraries that install on this CPU build of
torch, the fastest compilation, and JSON Schema, regex and EBNF (GBNF) grammars in one library.

Each step, the sampler asks `apply_grammar_masks` to set every token a sequence's grammar forbids to
-inf in that sequence's row of the batch's logits; after sampling, the engine feeds the token to
the matcher (`accept`). A finished grammar allows only the stop tokens, so a grammar request ends
with "stop" when the grammar is complete or with "length" at max_tokens, never waits.
"""

import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch
from kvpilot.serving.structured_outputs import StructuredOutputsParams
from kvpilot.serving.validation import InvalidParameter

CACHE_SIZE = 256  # compiled grammars kept (least recently used goes first)


class StructuredOutputManager:
    """Owns the tokenizer's grammar view and the compile cache. Built lazily by the engine (the
    tokenizer scan takes ~0.2 s) the first time a request asks for structured output."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        import xgrammar

        self._xgr = xgrammar
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[StructuredOutputsParams, object] = OrderedDict()
        self._lock = threading.Lock()  # requests may be processed on more than one thread
        self.num_compiled = 0  # cache misses, for tests and metrics

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar for `params`, from the cache when seen before; a spec the library
        rejects is an InvalidParameter naming the field."""
        with self._lock:
            compiled = self._cache.get(params)
            if compiled is not None:
                self._cache.move_to_end(params)
                return compiled
        try:
            compiled = self._compile(params)
        except (RuntimeError, ValueError) as exc:
            raise InvalidParameter(params.source, f"cannot be compiled: {_library_message(exc)}") from None
        with self._lock:
            self.num_compiled += 1
            self._cache[params] = compiled
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, params: StructuredOutputsParams):
        if params.json is not None:
            return self.compiler.compile_json_schema(params.json, any_whitespace=False)
        if params.json_object:
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if params.regex is not None:
            return self.compiler.compile_regex(params.regex)
        if params.choice is not None:
            return self.compiler.compile_grammar(_choice_grammar(params.choice))
        return self.compiler.compile_grammar(params.grammar)

    def new_matcher(self, params: StructuredOutputsParams) -> "GrammarState":
        return GrammarState(self._xgr.GrammarMatcher(self.compile(params)))


def apply_grammar_masks(logits: torch.Tensor, rows: Sequence[int], states: Sequence["GrammarState"]) -> None:
    """In place: in each of `rows`, -inf for every token that row's grammar forbids now."""
    import xgrammar

    vocab_size = logits.shape[-1]
    bitmask = xgrammar.allocate_token_bitmask(len(rows), vocab_size)
    for index, state in enumerate(states):
        state.matcher.fill_next_token_bitmask(bitmask, index)
    view = logits[list(rows)]
    xgrammar.apply_token_bitmask_inplace(view, bitmask.to(logits.device), vocab_size=vocab_size)
    logits[list(rows)] = view


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False if the grammar does not allow it (a bug: the mask
        allowed only tokens it accepts) or the grammar had already finished."""
        if self.matcher.is_terminated():
            return False
        return bool(self.matcher.accept_token(token_id))

    @property
    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


def _library_message(exc: Exception) -> str:
    """xgrammar's message without its `[time] file.cc:line:` prefix."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0])


def _choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly `choices`. Characters stay as they are: an ASCII
    escape would write one beyond U+FFFF as two UTF-16 halves, which the grammar reads as two
    characters that no text can contain."""
    import json

    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
