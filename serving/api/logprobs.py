"""The engine's per-token `{token_id: logprob}` maps, in OpenAI's two logprobs formats.

A token's `bytes` (chat) are its own bytes from the vocabulary, so that a character spread over
several tokens is rebuilt by joining them; `text_offset` (completions) counts the characters
those bytes decode to. Decoding each token alone would give U+FFFD for each part instead."""

import codecs

from kvpilot.serving.api.prompts import ModelInfo
from kvpilot.serving.api.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
)
from kvpilot.serving.engine.outputs import RequestOutput


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def _token_bytes(model: ModelInfo, token_id: int, skip_special_tokens: bool) -> bytes:
    """What the token adds to the text (nothing without a tokenizer: the text stays empty)."""
    if model.token_bytes is not None:
        return model.token_bytes(token_id, skip_special_tokens)
    if model.tokenizer is None:
        return b""
    return model.tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens).encode()


def _top(entry: dict[int, float], num_top: int) -> list[tuple[int, float]]:
    # The map holds the top-k plus the sampled token when it is not among them: keep the k best.
    return sorted(entry.items(), key=lambda item: -item[1])[:num_top]


class TextOffsets:
    """Where each next token starts in a completion's text, in characters, fed token after token
    (one per choice, kept across a stream's chunks). A token that starts inside a multi-byte
    character points at that character: its bytes complete no character until the last part."""

    def __init__(self, start: int = 0) -> None:
        self.num_chars = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, token_bytes: bytes) -> int:
        """The offset of the token with these bytes; the next token starts after it."""
        offset = self.num_chars
        self.num_chars += len(self._decoder.decode(token_bytes))
        return offset


def completion_logprobs(
    model: ModelInfo,
    token_ids: list[int],
    logprobs: list[dict[int, float]],
    num_top: int,
    offsets: TextOffsets,
    skip_special_tokens: bool,
    prompt_token_ids: list[int] | None = None,
    prompt_logprobs: list[dict[int, float] | None] | None = None,
) -> CompletionLogprobs:
    """`/v1/completions` format; `offsets` moves past `token_ids`. With `prompt_token_ids` (echo)
    the prompt tokens come first, with their `prompt_logprobs` (the first token has none, as in
    OpenAI's echo) and offsets from 0 (the echoed text of token ids is decoded with its special
    tokens); `offsets` then starts where the echoed prompt text ends."""
    tokenizer = model.tokenizer
    result = CompletionLogprobs()

    def add(token_id: int, entry: dict[int, float] | None, offset: int) -> None:
        result.tokens.append(_token_text(tokenizer, token_id))
        result.token_logprobs.append(None if entry is None else entry.get(token_id))
        result.top_logprobs.append(
            None if entry is None else {_token_text(tokenizer, t): lp for t, lp in _top(entry, num_top)}
        )
        result.text_offset.append(offset)

    prompt_offsets = TextOffsets()
    prompt_entries = prompt_logprobs or [None] * len(prompt_token_ids or [])
    for token_id, entry in zip(prompt_token_ids or [], prompt_entries, strict=True):
        add(token_id, entry, prompt_offsets.advance(_token_bytes(model, token_id, False)))
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        add(token_id, entry, offsets.advance(_token_bytes(model, token_id, skip_special_tokens)))
    return result


def chat_logprobs(
    model: ModelInfo,
    token_ids: list[int],
    logprobs: list[dict[int, float]],
    num_top: int,
    skip_special_tokens: bool,
) -> ChatLogprobs:
    tokenizer = model.tokenizer

    def token_bytes(token_id: int) -> list[int]:
        return list(_token_bytes(model, token_id, skip_special_tokens))

    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        top = [
            ChatTopLogprob(token=_token_text(tokenizer, t), logprob=lp, bytes=token_bytes(t))
            for t, lp in _top(entry, num_top)
        ]
        content.append(
            ChatTokenLogprob(
                token=_token_text(tokenizer, token_id),
                logprob=entry.get(token_id, -9999.0),
                bytes=token_bytes(token_id),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)


def vllm_prompt_logprobs(tokenizer, output: RequestOutput, num_top: int | None) -> PromptLogprobs | None:
    """vLLM's `prompt_logprobs` (None when not asked): per prompt token (None for the first) the
    token itself and the `num_top` most likely ones, keyed by token id; rank is known for the top
    ones only."""
    if num_top is None or output.prompt_logprobs is None:
        return None
    result: PromptLogprobs = []
    for token_id, entry in zip(output.prompt_token_ids, output.prompt_logprobs, strict=True):
        if entry is None:
            result.append(None)
            continue
        top = _top(entry, num_top)
        ranks = {t: rank for rank, (t, _) in enumerate(top, start=1)}
        wanted = {token_id: entry[token_id]} | dict(top)
        result.append(
            {
                str(t): PromptLogprob(logprob=lp, rank=ranks.get(t), decoded_token=_token_text(tokenizer, t))
                for t, lp in wanted.items()
            }
        )
    return result
