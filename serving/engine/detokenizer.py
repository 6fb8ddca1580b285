"""Incremental detokenization and stop strings, one instance per generated sequence.

Each new token is decoded as the difference between two decodes of a short window: the
tokens since `prefix_offset` with and without the tokens after `read_offset`. Text is only
released when it does not end in U+FFFD, i.e. never in the middle of a multi-byte character
whose bytes are spread over several byte-level tokens. The window starts with a few prompt
tokens so that tokenizers that drop a leading space at the start of a decode stay correct.

Stop strings count from the token after the first `min_tokens` (as vLLM does, and as EOS and
stop token ids, which the sampler masks until then): text those tokens complete never ends the
request.
"""

from kvpilot.serving.sampling_params import SamplingParams

PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = params.stop
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.num_output_tokens = 0
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.token_ids = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""
        # While running, hold back as many characters as a stop string could still claim, so
        # that the cumulative text a caller streams never shrinks when a stop string completes.
        holds_back = self.stop and not self.include_stop_str_in_output
        self.stop_buffer_length = max(map(len, self.stop)) - 1 if holds_back else 0

    def append(self, token_id: int) -> str | None:
        """Add one generated token; returns the stop string it completed, if any (text is cut)."""
        if self.tokenizer is None:
            return None
        num_chars_before = len(self.text)
        self.token_ids.append(token_id)
        self.num_output_tokens += 1
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return None  # incomplete character (or nothing visible yet): wait for more tokens
        self.text += new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        if self.num_output_tokens <= self.min_tokens:
            return None
        return self._check_stop_strings(num_chars_before)

    def output_text(self, finished: bool) -> str:
        if finished or not self.stop_buffer_length:
            return self.text
        return self.text[: max(0, len(self.text) - self.stop_buffer_length)]

    def _check_stop_strings(self, num_chars_before: int) -> str | None:
        """Find the earliest stop string that overlaps the new text and cut the text there."""
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self.text.find(stop, max(0, num_chars_before - len(stop) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.text = self.text[: index + len(stop) if self.include_stop_str_in_output else index]
        return stop

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
