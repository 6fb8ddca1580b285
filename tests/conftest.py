import os
from pathlib import Path

# One intra-op thread per process: the tests run servers in subprocesses beside the test process,
# and on 2 cores oversubscribed torch threads make token-by-token decoding up to 10x slower.
# Set before torch is imported so the servers the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from tests.checkpoints import (
    ARCHITECTURES,
    build_checkpoint,
    default_gguf_path,
    save_real_tokenizer,
)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    save_real_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """One small random checkpoint per supported architecture, with the real tokenizer."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: build_checkpoint(arch, root / arch, tokenizer_dir) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints) -> Path:
    return tiny_checkpoints["llama"]
