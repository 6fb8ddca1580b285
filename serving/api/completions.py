"""POST /v1/completions."""

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from kvpilot.serving.api.errors import APIError, bad_request, unavailable
from kvpilot.serving.api.logprobs import TextOffsets, completion_logprobs, vllm_prompt_logprobs
from kvpilot.serving.api.prompts import completion_prompts, sampling_params
from kvpilot.serving.api.protocol import (
    SSE_DONE,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    now,
    random_id,
    sse_event,
)
from kvpilot.serving.api.state import ServingState
from kvpilot.serving.api.streams import DeltaTracker, merge_streams
from kvpilot.serving.engine.outputs import RequestOutput

ABORTED_MESSAGE = "the request was aborted: the server is shutting down"


async def create_completion(request: CompletionRequest, state: ServingState):
    state.check_model(request.model)
    if request.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    model = state.model_info
    prompts = await state.off_loop(completion_prompts, request, model)
    params = [
        # max_tokens against the context (and None: what fits) is the engine's to check, once.
        sampling_params(request, request.max_tokens, request.logprobs, model.vocab_size)
        for p in prompts
    ]
    state.check_queue(len(prompts) * request.n, "prompt" if len(prompts) > 1 else "n")
    request_id = random_id("cmpl")
    streams = [
        state.generate(p.token_ids, sp, f"{request_id}-{i}")
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
    ]
    merged = merge_streams(streams)
    n = request.n
    prompt_texts = [p.text or "" for p in prompts]
    if request.stream:
        first = await anext(merged)  # engine-side validation errors surface here, before the 200
        return StreamingResponse(
            _stream(request, state, request_id, n, prompt_texts, first, merged),
            media_type="text/event-stream",
        )
    finals: dict[int, RequestOutput] = {}
    async for index, output in merged:
        if output.finished:
            finals[index] = output
    choices, usage = [], UsageInfo()
    for index in range(len(prompts)):
        output = finals[index]
        usage.prompt_tokens += len(output.prompt_token_ids)
        for seq in output.outputs:
            if seq.finish_reason == "abort":
                raise unavailable(ABORTED_MESSAGE, code="server_draining")
            usage.completion_tokens += len(seq.token_ids)
            text = (prompt_texts[index] if request.echo else "") + seq.text
            logprobs = None
            if request.logprobs is not None:
                logprobs = completion_logprobs(
                    model,
                    seq.token_ids,
                    seq.logprobs or [],
                    request.logprobs,
                    TextOffsets(len(prompt_texts[index]) if request.echo else 0),
                    request.skip_special_tokens,
                    prompt_token_ids=output.prompt_token_ids if request.echo else None,
                    prompt_logprobs=output.prompt_logprobs if request.echo else None,
                )
            choices.append(
                CompletionChoice(
                    index=index * n + seq.index,
                    text=text,
                    logprobs=logprobs,
                    prompt_logprobs=vllm_prompt_logprobs(model.tokenizer, output, request.prompt_logprobs),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return CompletionResponse(
        id=request_id, created=now(), model=state.model_name, choices=choices, usage=usage
    )


async def _stream(
    request: CompletionRequest,
    state: ServingState,
    request_id: str,
    n: int,
    prompt_texts: list[str],
    first: tuple[int, RequestOutput],
    merged: AsyncIterator[tuple[int, RequestOutput]],
) -> AsyncIterator[str]:
    created, tracker = now(), DeltaTracker()
    prompt_tokens: dict[int, int] = {}
    completion_tokens: dict[int, int] = {}
    model = state.model_info
    offsets: dict[int, TextOffsets] = {}  # per choice, across chunks
    try:
        pending = [first]
        while True:
            for index, output in pending:
                prompt_tokens[index] = len(output.prompt_token_ids)
                for seq in output.outputs:
                    choice = index * n + seq.index
                    completion_tokens[choice] = len(seq.token_ids)
                    if seq.finish_reason == "abort":
                        yield sse_event(unavailable(ABORTED_MESSAGE, code="server_draining").body())
                        yield SSE_DONE
                        return
                    is_first = choice not in tracker.text_sent
                    delta = tracker.delta(choice, seq)
                    if delta is None:
                        continue
                    text, new_tokens = delta
                    echo_prompt = is_first and request.echo
                    if echo_prompt:
                        text = prompt_texts[index] + text
                    logprobs = None
                    if request.logprobs is not None:
                        echoed = len(prompt_texts[index]) if request.echo else 0
                        logprobs = completion_logprobs(
                            model,
                            seq.token_ids[new_tokens],
                            (seq.logprobs or [])[new_tokens],
                            request.logprobs,
                            offsets.setdefault(choice, TextOffsets(echoed)),
                            request.skip_special_tokens,
                            prompt_token_ids=output.prompt_token_ids if echo_prompt else None,
                            prompt_logprobs=output.prompt_logprobs if echo_prompt else None,
                        )
                    prompt_logprobs = (
                        vllm_prompt_logprobs(model.tokenizer, output, request.prompt_logprobs)
                        if is_first
                        else None
                    )
                    chunk = CompletionResponse(
                        id=request_id,
                        created=created,
                        model=state.model_name,
                        choices=[
                            CompletionChoice(
                                index=choice,
                                text=text,
                                logprobs=logprobs,
                                prompt_logprobs=prompt_logprobs,
                                finish_reason=seq.finish_reason,
                                stop_reason=seq.stop_reason,
                            )
                        ],
                    )
                    yield sse_event(chunk)
            next_item = await anext(merged, None)
            if next_item is None:
                break
            pending = [next_item]
        if request.stream_options is not None and request.stream_options.include_usage:
            usage = UsageInfo(
                prompt_tokens=sum(prompt_tokens.values()), completion_tokens=sum(completion_tokens.values())
            )
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield sse_event(
                CompletionResponse(
                    id=request_id, created=created, model=state.model_name, choices=[], usage=usage
                )
            )
        yield SSE_DONE
    except APIError as exc:  # e.g. the engine died mid-stream: the client hears it, the stream ends cleanly
        yield sse_event(exc.body())
        yield SSE_DONE
    finally:
        await merged.aclose()
