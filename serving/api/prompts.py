"""From request bodies to engine inputs: prompts as token ids, and `SamplingParams`.

Tokenizing and template rendering are slow on long text, so the endpoints run `completion_prompts`
and `chat_prompt` off the event loop (`ServingState.off_loop`); both first reject text that
cannot fit the context by its length alone, before any tokenizer sees it.
"""

from dataclasses import dataclass

import jinja2
from kvpilot.serving.api.errors import bad_request
from kvpilot.serving.api.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from kvpilot.serving.api.structured import structured_outputs_params
from kvpilot.serving.api.token_bytes import TokenBytes
from kvpilot.serving.api.tools import ToolPlan, conversation
from kvpilot.serving.sampling_params import SamplingParams
from kvpilot.serving.structured_outputs import StructuredOutputsParams
from kvpilot.serving.validation import CONTEXT_LENGTH_EXCEEDED, InvalidParameter

# A tokenizer's normalizer may join characters (NFC) before the vocabulary sees them: leave room.
CHARS_PER_TOKEN_MARGIN = 2


@dataclass(frozen=True)
class EnginePrompt:
    token_ids: list[int]
    text: str | None  # the prompt as text, for `echo`; None when it came as token ids without a tokenizer


@dataclass(frozen=True)
class ModelInfo:
    """What request translation needs to know about the served model."""

    tokenizer: object | None
    chat_template: str | None
    max_model_len: int
    vocab_size: int
    max_prompt_chars: int | None = None  # more characters cannot fit max_model_len tokens
    token_bytes: TokenBytes | None = None  # for logprobs; None: each token decoded alone


def max_prompt_chars(tokenizer, max_model_len: int) -> int | None:
    """max_model_len x the longest vocabulary entry (no token spells more characters than its
    entry has, byte-level or SentencePiece) x a margin; None without a tokenizer."""
    if tokenizer is None:
        return None
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    return max_model_len * longest * CHARS_PER_TOKEN_MARGIN


def check_text_length(num_chars: int, model: ModelInfo, param: str) -> None:
    """A 400 at once for text far longer than the context can hold (no tokenizing needed)."""
    if model.max_prompt_chars is not None and num_chars > model.max_prompt_chars:
        raise bad_request(
            f"{param}: {num_chars} characters cannot fit max_model_len = {model.max_model_len} tokens "
            f"(at most {model.max_prompt_chars} characters)",
            param=param,
            code=CONTEXT_LENGTH_EXCEEDED,
        )


def completion_prompts(request: CompletionRequest, model: ModelInfo) -> list[EnginePrompt]:
    prompt = request.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    for p in prompt:
        if isinstance(p, str):
            check_text_length(len(p), model, "prompt")
        elif len(p) > model.max_model_len:
            raise bad_request(
                f"prompt: {len(p)} token ids exceed max_model_len = {model.max_model_len}",
                param="prompt",
                code=CONTEXT_LENGTH_EXCEEDED,
            )
    return [_one_prompt(p, model) for p in prompt]


def _one_prompt(prompt: str | list[int], model: ModelInfo) -> EnginePrompt:
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise bad_request("this model has no tokenizer: send the prompt as token ids", param="prompt")
        return EnginePrompt(model.tokenizer.encode(prompt), prompt)
    if max(prompt) >= model.vocab_size:
        raise bad_request(f"prompt: token id {max(prompt)} is out of range [0, {model.vocab_size})", "prompt")
    text = model.tokenizer.decode(prompt) if model.tokenizer is not None else None
    return EnginePrompt(list(prompt), text)


def chat_prompt(
    request: ChatCompletionRequest, model: ModelInfo, tools: ToolPlan | None = None
) -> EnginePrompt:
    if model.tokenizer is None or not model.chat_template:
        raise bad_request(
            "this model has no chat template (tokenizer_config.json has no chat_template): "
            "use /v1/completions",
            param="messages",
        )
    messages = conversation(request.messages, tools.system_prompt if tools else None)
    if "developer" not in model.chat_template:
        # OpenAI's newer name for the system message: a template that does not know it would
        # write a `developer` turn and still add its own default system prompt.
        messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    check_text_length(sum(len(m["content"]) for m in messages), model, "messages")
    try:
        text = model.tokenizer.apply_chat_template(
            messages,
            tools=tools.template_tools if tools else None,
            chat_template=model.chat_template,
            add_generation_prompt=request.add_generation_prompt,
            tokenize=False,
        )
    except (jinja2.TemplateError, ValueError) as exc:
        raise bad_request(f"messages: the chat template rejected them: {exc}", param="messages") from None
    # The template already wrote any special tokens (BOS, role markers); don't add them twice.
    return EnginePrompt(model.tokenizer.encode(text, add_special_tokens=False), text)


def sampling_params(
    request: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    vocab_size: int,
    structured: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """`structured`: a grammar the caller imposes (tool calling); else the request's own
    response_format / structured_outputs."""
    structured = structured or structured_outputs_params(request)
    stop = request.stop if request.stop is not None else ()
    try:
        return SamplingParams(
            n=request.n,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            min_p=request.min_p,
            repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias=_logit_bias(request.logit_bias, vocab_size),
            seed=request.seed,
            max_tokens=max_tokens,
            min_tokens=request.min_tokens,
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            stop_token_ids=tuple(request.stop_token_ids or ()),  # ranges: the engine checks them
            include_stop_str_in_output=request.include_stop_str_in_output,
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=_prompt_logprobs(request, logprobs),
            skip_special_tokens=request.skip_special_tokens,
            structured_outputs=structured,
        )
    except InvalidParameter as exc:
        raise bad_request(str(exc), param=exc.param) from None


def _prompt_logprobs(request: SamplingFields, logprobs: int | None) -> int | None:
    """vLLM's `prompt_logprobs`; `echo` with `logprobs` needs them too (for the echoed prompt)."""
    if isinstance(request, CompletionRequest) and request.echo and logprobs is not None:
        return max(logprobs, request.prompt_logprobs or 0)
    return request.prompt_logprobs


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """OpenAI's string keys as token ids (whether each is in the vocabulary: the engine checks)."""
    result = {}
    for key, value in (bias or {}).items():
        digits = key.strip()
        if not (digits.isascii() and digits.isdigit()):  # "²".isdigit(), yet int("²") fails
            raise bad_request(
                f"logit_bias: key {key[:40]!r} is not a token id in [0, {vocab_size})", param="logit_bias"
            )
        result[int(digits)] = value
    return result
