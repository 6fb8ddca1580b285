"""Verify draft tokens against the target model's logits (speculative decoding).

A sampling chunk with d draft tokens brings d + 1 logit rows: row j is the model's prediction
after the request's tokens and drafts[:j]. Every row is processed exactly as the sampler would
process it for a request that had already generated drafts[:j] (penalties, logit_bias, the
min_tokens mask), so verification sees the same distributions as one-token-at-a-time decoding.

- Greedy: drafts are accepted while each equals the row's argmax; then the first mismatching
  row's argmax (or the last row's, when all match) is appended. Token-identical to decoding
  without drafts.
- Sampling: standard rejection sampling with a deterministic draft (q is a point mass on the
  draft token x): accept x with probability min(1, p(x) / q(x)) = p(x); on rejection, sample from
  normalize(max(0, p - q)), i.e. p without x; when all d are accepted, sample one more token
  from the last row. Every emitted token is distributed exactly as p (Leviathan et al., 2023).

Seeded requests draw from their own generator; the others share the engine's.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from kvpilot.serving.engine.logprobs import token_logprobs
from kvpilot.serving.engine.request import Request
from kvpilot.serving.engine.sampler import Sampler, argmax_rows, filter_logits


@dataclass
class SpecSamplerOutput:
    token_ids: list[list[int]]  # per request: the accepted drafts, then one sampled token
    logprobs: list[list[dict[int, float]] | None]  # per request, one entry per token above


class _PositionView:
    """A request as the sampler sees it at a draft position: as if drafts[:j] were output already."""

    def __init__(self, request: Request, draft_prefix: list[int]) -> None:
        self.request = request
        self.draft_prefix = draft_prefix
        self.sampling_params = request.sampling_params
        self.prompt_token_ids = request.prompt_token_ids
        self.generator = request.generator
        # The matcher's state is the request's (position 0): requests with a grammar get no drafts.
        self.grammar = request.grammar

    @property
    def output_token_ids(self) -> list[int]:
        return self.request.output_token_ids + self.draft_prefix

    @property
    def num_output_tokens(self) -> int:
        return self.request.num_output_tokens + len(self.draft_prefix)


class RejectionSampler:
    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler  # its logits processing, and its generator for unseeded requests

    def __call__(
        self, logits: torch.Tensor, requests: Sequence[Request], draft_token_ids: Sequence[list[int]]
    ) -> SpecSamplerOutput:
        """logits: float32 [sum(len(d) + 1 for d in draft_token_ids), vocab]; request i owns the
        len(draft_token_ids[i]) + 1 rows after those of requests[:i]."""
        views = [
            _PositionView(request, drafts[:j])
            for request, drafts in zip(requests, draft_token_ids, strict=True)
            for j in range(len(drafts) + 1)
        ]
        if len(views) != logits.shape[0]:
            raise ValueError(f"got {logits.shape[0]} logit rows for {len(views)} positions")
        processed = self.sampler.process_logits(logits, views)
        offsets = [0]
        for drafts in draft_token_ids:
            offsets.append(offsets[-1] + len(drafts) + 1)
        greedy_ids = argmax_rows(processed).tolist()
        probs = self._probs(processed, views)
        token_ids: list[list[int]] = []
        for i, (request, drafts) in enumerate(zip(requests, draft_token_ids, strict=True)):
            rows = range(offsets[i], offsets[i + 1])
            if request.sampling_params.is_greedy:
                token_ids.append(_accept_greedy(drafts, [greedy_ids[row] for row in rows]))
            else:
                generator = request.generator or self.sampler.generator
                token_ids.append(_accept_sampled(drafts, [probs[row] for row in rows], generator))
        logprobs: list[list[dict[int, float]] | None] = []
        for i, request in enumerate(requests):
            num_top = request.sampling_params.logprobs
            if num_top is None:
                logprobs.append(None)
                continue
            rows = logits[offsets[i] : offsets[i] + len(token_ids[i])]
            logprobs.append(token_logprobs(rows, token_ids[i], num_top))
        return SpecSamplerOutput(token_ids, logprobs)

    @staticmethod
    def _probs(processed: torch.Tensor, views: list[_PositionView]) -> dict[int, torch.Tensor]:
        """Row -> the sampling distribution (temperature, min-p, top-k, top-p) of each random row."""
        rows = [row for row, view in enumerate(views) if not view.sampling_params.is_greedy]
        if not rows:
            return {}
        params = [views[row].sampling_params for row in rows]
        scaled = processed[torch.tensor(rows)] / torch.tensor([p.temperature for p in params])[:, None]
        filtered = filter_logits(
            scaled,
            top_k=[p.top_k for p in params],
            top_p=[p.top_p for p in params],
            min_p=[p.min_p for p in params],
        )
        return dict(zip(rows, torch.softmax(filtered, dim=-1), strict=True))


def _accept_greedy(drafts: list[int], targets: list[int]) -> list[int]:
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return [*drafts[:accepted], targets[accepted]]


def _accept_sampled(drafts: list[int], probs: list[torch.Tensor], generator: torch.Generator) -> list[int]:
    emitted = []
    for draft, p in zip(drafts, probs, strict=False):
        if torch.rand((), generator=generator) < p[draft]:
            emitted.append(draft)
            continue
        residual = p.clone()
        residual[draft] = 0.0
        return [*emitted, _sample(residual, generator)]
    return [*emitted, _sample(probs[len(drafts)], generator)]


def _sample(weights: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from weights / weights.sum() by the exponential race, as the sampler draws."""
    noise = torch.empty_like(weights).exponential_(generator=generator)
    return int((weights / noise).argmax())
