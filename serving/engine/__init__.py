"""The engine core, after vLLM V1's `core` + `engine`: requests, the KV block pool and its
manager, the scheduler and what it hands the model runner, the sampler and detokenizer, the
synchronous `LLMEngine` (schedule -> run the model -> update) and the background `AsyncLLM`."""
