"""POST /v1/chat/completions."""

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from kvpilot.serving.api.completions import ABORTED_MESSAGE
from kvpilot.serving.api.errors import APIError, bad_request, unavailable
from kvpilot.serving.api.logprobs import chat_logprobs, vllm_prompt_logprobs
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
from kvpilot.serving.api.tool_parsers import ToolCallParser
from kvpilot.serving.api.tools import ToolCallDeltas, finish_reason, message_parts, plan_tools
from kvpilot.serving.engine.outputs import RequestOutput


async def create_chat_completion(request: ChatCompletionRequest, state: ServingState):
    state.check_model(request.model)
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    model = state.model_info
    tools = plan_tools(request, model.chat_template or "")
    prompt = await state.off_loop(chat_prompt, request, model, tools)
    max_tokens = request.max_completion_tokens or request.max_tokens
    num_top = (request.top_logprobs or 0) if request.logprobs else None
    structured = tools.structured if tools else None
    params = sampling_params(request, max_tokens, num_top, model.vocab_size, structured)  # the engine fits it
    parser = tools.parser if tools else None
    state.check_queue(request.n, "n")
    request_id = random_id("chatcmpl")
    stream = state.generate(prompt.token_ids, params, request_id)
    if request.stream:
        first = await anext(stream)  # engine-side validation errors surface here, before the 200
        return StreamingResponse(
            _stream(request, state, request_id, first, stream, parser), media_type="text/event-stream"
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
            logprobs = chat_logprobs(
                model, seq.token_ids, seq.logprobs or [], num_top, request.skip_special_tokens
            )
        content, tool_calls = message_parts(parser, seq.text)
        choices.append(
            ChatChoice(
                index=seq.index,
                message=ChatResponseMessage(content=content, tool_calls=tool_calls),
                logprobs=logprobs,
                finish_reason=finish_reason(parser, seq.finish_reason, bool(tool_calls)),
                stop_reason=seq.stop_reason,
            )
        )
    return ChatCompletionResponse(
        id=request_id,
        created=now(),
        model=state.model_name,
        choices=choices,
        usage=_usage(final),
        prompt_logprobs=vllm_prompt_logprobs(model.tokenizer, final, request.prompt_logprobs),
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
    parser: ToolCallParser | None,
) -> AsyncIterator[str]:
    created, tracker = now(), DeltaTracker()
    tool_deltas = {index: ToolCallDeltas(parser) for index in range(request.n)} if parser else {}
    model = state.model_info
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
                        model,
                        seq.token_ids[new_tokens],
                        (seq.logprobs or [])[new_tokens],
                        num_top,
                        request.skip_special_tokens,
                    )
                delta_message = DeltaMessage(content=text)
                reason = seq.finish_reason
                if parser is not None:
                    deltas = tool_deltas[seq.index]
                    content, calls = deltas.delta(seq.text, seq.finished)
                    delta_message = DeltaMessage(content=content, tool_calls=calls or None)
                    reason = finish_reason(parser, reason, deltas.has_calls)
                yield chunk(
                    ChatChunkChoice(
                        index=seq.index, delta=delta_message, logprobs=logprobs, finish_reason=reason
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
