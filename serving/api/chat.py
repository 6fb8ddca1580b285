"""POST /v1/chat/completions."""

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from kvpilot.serving.api.completions import ABORTED_MESSAGE
from kvpilot.serving.api.errors import APIError, bad_request, unavailable
from kvpilot.serving.api.logprobs import chat_logprobs
from kvpilot.serving.api.prompts import chat_prompt, sampling_params
from kvpilot.serving.api.protocol import (
    SSE_DONE,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
    now,
    random_id,
    sse_event,
)
from kvpilot.serving.api.state import ServingState
from kvpilot.serving.api.streams import DeltaTracker
from kvpilot.serving.engine.outputs import RequestOutput


async def create_chat_completion(request: ChatCompletionRequest, state: ServingState):
    state.check_model(request.model)
    if request.response_format is not None and request.response_format.type != "text":
        raise bad_request(
            f"response_format: type {request.response_format.type!r} is not supported yet; only 'text'",
            param="response_format",
        )
    if request.tools:
        raise bad_request("tools: function calling is not supported", param="tools")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    model = state.model_info
    prompt = await state.off_loop(chat_prompt, request, model)
    max_tokens = request.max_completion_tokens or request.max_tokens
    num_top = (request.top_logprobs or 0) if request.logprobs else None
    params = sampling_params(request, max_tokens, num_top, model.vocab_size)  # the engine fits it
    state.check_queue()
    request_id = random_id("chatcmpl")
    stream = state.generate(prompt.token_ids, params, request_id)
    if request.stream:
        first = await anext(stream)  # engine-side validation errors surface here, before the 200
        return StreamingResponse(
            _stream(request, state, request_id, first, stream), media_type="text/event-stream"
        )
    final = None
    async for output in stream:
        final = output
    choices = []
    for seq in final.outputs:
        if seq.finish_reason == "abort":
            raise unavailable(ABORTED_MESSAGE, code="server_draining")
        logprobs = None
        if num_top is not None:
            logprobs = chat_logprobs(model.tokenizer, seq.token_ids, seq.logprobs or [], num_top)
        choices.append(
            ChatChoice(
                index=seq.index,
                message=ChatResponseMessage(content=seq.text),
                logprobs=logprobs,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
        )
    return ChatCompletionResponse(
        id=request_id, created=now(), model=state.model_name, choices=choices, usage=_usage(final)
    )


def _usage(output: RequestOutput) -> UsageInfo:
    prompt_tokens = len(output.prompt_token_ids)
    completion_tokens = sum(len(seq.token_ids) for seq in output.outputs)
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


async def _stream(
    request: ChatCompletionRequest,
    state: ServingState,
    request_id: str,
    first: RequestOutput,
    stream: AsyncIterator[RequestOutput],
) -> AsyncIterator[str]:
    created, tracker = now(), DeltaTracker()
    tokenizer = state.model_info.tokenizer
    num_top = (request.top_logprobs or 0) if request.logprobs else None

    def chunk(choice: ChatChunkChoice) -> str:
        return sse_event(
            ChatCompletionChunk(id=request_id, created=created, model=state.model_name, choices=[choice])
        )

    try:
        for index in range(request.n):  # the role comes first, alone, as OpenAI sends it
            yield chunk(ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content="")))
        output = first
        while output is not None:
            for seq in output.outputs:
                if seq.finish_reason == "abort":
                    yield sse_event(unavailable(ABORTED_MESSAGE, code="server_draining").body())
                    yield SSE_DONE
                    return
                delta = tracker.delta(seq.index, seq)
                if delta is None:
                    continue
                text, new_tokens = delta
                logprobs = None
                if num_top is not None:
                    logprobs = chat_logprobs(
                        tokenizer, seq.token_ids[new_tokens], (seq.logprobs or [])[new_tokens], num_top
                    )
                yield chunk(
                    ChatChunkChoice(
                        index=seq.index,
                        delta=DeltaMessage(content=text),
                        logprobs=logprobs,
                        finish_reason=seq.finish_reason,
                    )
                )
            last, output = output, await anext(stream, None)
        if request.stream_options is not None and request.stream_options.include_usage:
            yield sse_event(
                ChatCompletionChunk(
                    id=request_id, created=created, model=state.model_name, choices=[], usage=_usage(last)
                )
            )
        yield SSE_DONE
    except APIError as exc:
        yield sse_event(exc.body())
        yield SSE_DONE
    finally:
        await stream.aclose()
