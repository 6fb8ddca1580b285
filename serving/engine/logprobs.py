"""Logprob entries as the engine reports them: `{token id: logprob}` for a chosen token and the
top-k of its position, from raw model logits (before penalties, bias or temperature)."""

import torch


def token_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: int) -> list[dict[int, float]]:
    """logits [n, vocab] (any device, any float dtype); entry i holds token_ids[i] and the
    `num_top` most likely tokens of row i."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device)[:, None])[:, 0].tolist()
    entries = [{token_id: value} for token_id, value in zip(token_ids, chosen, strict=True)]
    if num_top:
        top_values, top_ids = logprobs.topk(num_top, dim=-1)
        for entry, ids, values in zip(entries, top_ids.tolist(), top_values.tolist(), strict=True):
            entry.update(zip(ids, values, strict=True))
    return entries
