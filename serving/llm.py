"""The offline API, shaped like vLLM's `LLM`."""

import itertools
from collections.abc import Sequence

from kvpilot.serving.engine.config import EngineConfig
from kvpilot.serving.engine.llm_engine import LLMEngine
from kvpilot.serving.engine.outputs import RequestOutput
from kvpilot.serving.sampling_params import SamplingParams
from kvpilot.serving.validation import InvalidParameter

Prompt = str | list[int]


class LLM:
    """`LLM(model="dir-or.gguf", block_size=16, num_kv_blocks=None, ...)`: every keyword is an
    `EngineConfig` field."""

    def __init__(self, model: str, **engine_config) -> None:
        self.llm_engine = LLMEngine(EngineConfig(model=str(model), **engine_config))
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts to completion with continuous batching; outputs are in input order."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise InvalidParameter(
                    "sampling_params",
                    f"got {len(params_list)} for {len(prompt_list)} prompts; "
                    "pass one SamplingParams or one per prompt",
                )
        engine = self.llm_engine
        request_ids = []
        stepping = False
        try:
            for prompt, params in zip(prompt_list, params_list, strict=True):
                request_id = f"llm-{next(self._request_counter)}"
                engine.add_request(request_id, prompt, params)
                request_ids.append(request_id)
            finished: dict[str, RequestOutput] = {}
            while engine.has_unfinished():
                stepping = True
                outputs = engine.step()
                stepping = False
                for output in outputs:
                    if output.finished:
                        finished[output.request_id] = output
        except BaseException:
            engine.abort_request(request_ids)  # e.g. a bad prompt in the middle: free what was queued
            if stepping:  # e.g. Ctrl-C in a forward: what that step registered in the cache is unwritten
                engine.reset_prefix_cache()
            raise
        return [finished[request_id] for request_id in request_ids]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return [prompts]  # one prompt of token ids
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str | list | tuple):
            raise InvalidParameter(
                f"prompts[{i}]", f"expected a string or a list of token ids, got {type(prompt).__name__}"
            )
    return [p if isinstance(p, str) else list(p) for p in prompts]
