"""The engine's per-token `{token_id: logprob}` maps, in OpenAI's two logprobs formats."""

from kvpilot.serving.api.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
)


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def _top(entry: dict[int, float], num_top: int) -> list[tuple[int, float]]:
    # The map holds the top-k plus the sampled token when it is not among them: keep the k best.
    return sorted(entry.items(), key=lambda item: -item[1])[:num_top]


def completion_logprobs(
    tokenizer,
    token_ids: list[int],
    logprobs: list[dict[int, float]],
    num_top: int,
    text_offset: int,
    prompt_token_ids: list[int] | None = None,
    prompt_logprobs: list[dict[int, float] | None] | None = None,
) -> CompletionLogprobs:
    """`/v1/completions` format; with `prompt_token_ids` (echo) the prompt tokens come first, with
    their `prompt_logprobs` (the first token has none)."""
    result = CompletionLogprobs()
    offset = text_offset
    prompt_entries = prompt_logprobs or [None] * len(prompt_token_ids or [])
    for token_id, entry in zip(prompt_token_ids or [], prompt_entries, strict=False):
        text = _token_text(tokenizer, token_id)
        result.tokens.append(text)
        result.token_logprobs.append(entry.get(token_id) if entry else None)
        top = {_token_text(tokenizer, t): lp for t, lp in _top(entry, num_top)} if entry else None
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(text)
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        text = _token_text(tokenizer, token_id)
        result.tokens.append(text)
        result.token_logprobs.append(entry.get(token_id))
        result.top_logprobs.append({_token_text(tokenizer, t): lp for t, lp in _top(entry, num_top)})
        result.text_offset.append(offset)
        offset += len(text)
    return result


def chat_logprobs(
    tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], num_top: int
) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        text = _token_text(tokenizer, token_id)
        top = [
            ChatTopLogprob(
                token=_token_text(tokenizer, t), logprob=lp, bytes=list(_token_text(tokenizer, t).encode())
            )
            for t, lp in _top(entry, num_top)
        ]
        content.append(
            ChatTokenLogprob(
                token=text, logprob=entry.get(token_id, -9999.0), bytes=list(text.encode()), top_logprobs=top
            )
        )
    return ChatLogprobs(content=content)


def prompt_logprobs_body(
    tokenizer, prompt_logprobs: list[dict[int, float] | None] | None
) -> PromptLogprobs | None:
    """vLLM's `prompt_logprobs`: per prompt token {token id: {logprob, decoded_token}}."""
    if prompt_logprobs is None:
        return None
    return [
        None
        if entry is None
        else {
            str(t): PromptLogprob(logprob=lp, decoded_token=_token_text(tokenizer, t))
            for t, lp in entry.items()
        }
        for entry in prompt_logprobs
    ]
