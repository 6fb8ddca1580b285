"""Turn a step's logits into one token per sampling request, batched over requests.

Order of operations (as in vLLM): logprobs are taken from the *raw* model logits (log-softmax
before penalties, bias or temperature: vLLM's default `raw_logprobs`); then repetition /
presence / frequency penalties, logit_bias, the min_tokens mask and the grammar masks of
structured-output requests (a grammar decides alone when its output may end, so min_tokens does
not apply to it); then greedy rows take the argmax, and random rows apply temperature, min-p,
top-k and top-p and sample.

Sampling uses the exponential race (argmax of p / q with q ~ Exp(1) draws from p): each seeded
request fills its own row of q from its own generator, so its tokens do not depend on what
else is in the batch. Unseeded rows share the engine's generator.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from kvpilot.kernels.backend import select_backend
from kvpilot.serving.engine.request import Request
from kvpilot.serving.engine.structured_output import apply_grammar_masks

NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: {sampled id: logprob, top ids: logprob} when the request asked for logprobs.
    logprobs: list[dict[int, float] | None]


class Sampler:
    def __init__(self, eos_token_ids: Iterable[int], generator: torch.Generator) -> None:
        self.eos_token_ids = tuple(sorted(eos_token_ids))
        self.generator = generator  # for requests without a seed

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SamplerOutput:
        """logits: float32 [len(requests), vocab_size], row i belongs to requests[i]."""
        raw_logits = logits
        logits = self.process_logits(logits, requests)
        if all(r.sampling_params.is_greedy for r in requests):  # fast path: no randomness at all
            token_ids = argmax_rows(logits).tolist()
        else:
            token_ids = self._sample(logits, requests)
        return SamplerOutput(token_ids, self._logprobs(raw_logits, requests, token_ids))

    def process_logits(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """Penalties, logit_bias, the min_tokens mask and grammar masks; the input tensor is
        never modified."""
        penalized = [i for i, r in enumerate(requests) if _has_penalties(r)]
        biased = [i for i, r in enumerate(requests) if r.sampling_params.logit_bias]
        constrained = [i for i, r in enumerate(requests) if r.grammar is not None]
        masked = [
            i
            for i, r in enumerate(requests)
            if r.num_output_tokens < r.sampling_params.min_tokens and r.grammar is None
        ]
        if not (penalized or biased or masked or constrained):
            return logits
        logits = logits.clone()
        if penalized:
            rows = torch.tensor(penalized)
            logits[rows] = _apply_penalties(logits[rows], [requests[i] for i in penalized])
        for i in biased:
            bias = requests[i].sampling_params.logit_bias
            logits[i, list(bias)] += torch.tensor(list(bias.values()), dtype=logits.dtype)
        for i in masked:
            params = requests[i].sampling_params
            stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
            if stop_ids:
                logits[i, sorted(stop_ids)] = NEG_INF
        if constrained:
            apply_grammar_masks(logits, constrained, [requests[i].grammar for i in constrained])
        return logits

    def _sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
        params = [r.sampling_params for r in requests]
        greedy_ids = argmax_rows(logits)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        rows = torch.tensor(random_rows)
        scaled = logits[rows] / torch.tensor([params[i].temperature for i in random_rows])[:, None]
        filtered = filter_logits(
            scaled,
            top_k=[params[i].top_k for i in random_rows],
            top_p=[params[i].top_p for i in random_rows],
            min_p=[params[i].min_p for i in random_rows],
        )
        probs = torch.softmax(filtered, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, i in enumerate(random_rows):
            if requests[i].generator is not None:
                noise[row].exponential_(generator=requests[i].generator)
        sampled = argmax_rows(probs / noise)
        token_ids = greedy_ids.clone()
        token_ids[rows] = sampled
        return token_ids.tolist()

    def _logprobs(
        self, raw_logits: torch.Tensor, requests: Sequence[Request], token_ids: list[int]
    ) -> list[dict[int, float] | None]:
        wanted = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
        result: list[dict[int, float] | None] = [None] * len(requests)
        if not wanted:
            return result
        logprobs = torch.log_softmax(raw_logits[torch.tensor(wanted)], dim=-1)
        max_top = max(requests[i].sampling_params.logprobs for i in wanted)
        top_values, top_ids = logprobs.topk(max_top, dim=-1) if max_top else (None, None)
        for row, i in enumerate(wanted):
            entry = {token_ids[i]: float(logprobs[row, token_ids[i]])}
            num_top = requests[i].sampling_params.logprobs
            if num_top:
                ids, values = top_ids[row, :num_top].tolist(), top_values[row, :num_top].tolist()
                entry.update(zip(ids, values, strict=True))
            result[i] = entry
        return result


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)`: the first of equal maxima, NaN counting as the largest."""
    return select_backend(x.device).argmax_rows(x)


def filter_logits(
    logits: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]
) -> torch.Tensor:
    """Set excluded tokens to -inf: min-p (relative to the most likely token), then top-k, then
    top-p (the smallest set of most likely tokens whose probability reaches top_p)."""
    vocab_size = logits.shape[-1]
    if any(p > 0 for p in min_p):
        probs = torch.softmax(logits, dim=-1)
        threshold = torch.tensor(min_p)[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, NEG_INF)
    use_top_k = any(0 < k < vocab_size for k in top_k)
    use_top_p = any(p < 1.0 for p in top_p)
    if not (use_top_k or use_top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if use_top_k:
        k = torch.tensor([k if k > 0 else vocab_size for k in top_k])
        sorted_logits.masked_fill_(torch.arange(vocab_size)[None, :] >= k[:, None], NEG_INF)
    if use_top_p:
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most likely token always stays
        limit = torch.tensor([p if p < 1.0 else float("inf") for p in top_p])[:, None]
        sorted_logits.masked_fill_(mass_before >= limit, NEG_INF)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _has_penalties(request: Request) -> bool:
    p = request.sampling_params
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """As in vLLM: repetition over prompt + output tokens (divide positive logits, multiply
    negative ones); presence and frequency over output tokens only (OpenAI's definition)."""
    num_rows, vocab_size = logits.shape
    output_counts = torch.zeros(num_rows, vocab_size)
    seen = torch.zeros(num_rows, vocab_size, dtype=torch.bool)
    for row, request in enumerate(requests):
        if request.output_token_ids:
            output = torch.tensor(request.output_token_ids)
            output_counts[row].index_add_(0, output, torch.ones(len(output)))
        seen[row, request.prompt_token_ids] = True
    seen |= output_counts > 0
    params = [r.sampling_params for r in requests]
    repetition = torch.tensor([p.repetition_penalty for p in params])[:, None]
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    frequency = torch.tensor([p.frequency_penalty for p in params])[:, None]
    presence = torch.tensor([p.presence_penalty for p in params])[:, None]
    return logits - frequency * output_counts - presence * (output_counts > 0).float()
