import pytest
import transformers
from kvpilot.serving.bench.workload import (
    WorkloadRequest,
    WorkloadSpec,
    build_workload,
    default_text_path,
    read_text,
    subset,
    tokenize_text,
    total_input_tokens,
    total_output_tokens,
)


@pytest.fixture(scope="module")
def text_token_ids(tokenizer_dir) -> list[int]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenize_text(tokenizer, read_text())  # the English text shipped in kvpilot.serving/data


def test_shipped_text_is_long_enough_for_the_longest_prompt(text_token_ids):
    assert default_text_path().parent.name == "data"
    assert len(text_token_ids) >= 10 * WorkloadSpec().max_input_len


def test_default_workload_is_seeded_and_within_bounds(text_token_ids):
    spec = WorkloadSpec()
    workload = build_workload(text_token_ids, spec)
    assert workload == build_workload(text_token_ids, WorkloadSpec())  # same seed, same requests
    assert workload != build_workload(text_token_ids, WorkloadSpec(seed=1))
    assert len(workload) == 128
    assert len({r.request_id for r in workload}) == 128
    assert all(16 <= r.prompt_len <= 256 and 16 <= r.output_len <= 512 for r in workload)
    # Each prompt is a contiguous window of the tokenized text.
    joined = ",".join(map(str, text_token_ids))
    assert all(",".join(map(str, r.prompt_token_ids)) in joined for r in workload)
    # Draws cover the ranges rather than sticking to one value.
    assert max(r.output_len for r in workload) - min(r.output_len for r in workload) > 300


def test_exact_token_counts_with_fixed_lengths(text_token_ids):
    spec = WorkloadSpec(num_prompts=5, min_input_len=32, max_input_len=32, min_output_len=7, max_output_len=7)
    workload = build_workload(text_token_ids, spec)
    assert [r.prompt_len for r in workload] == [32] * 5
    assert total_input_tokens(workload) == 160
    assert total_output_tokens(workload) == 35


def test_shrinking_keeps_the_first_requests(text_token_ids):
    full = build_workload(text_token_ids, WorkloadSpec())
    assert build_workload(text_token_ids, WorkloadSpec(num_prompts=10)) == full[:10]


def test_seeded_subset_keeps_workload_order(text_token_ids):
    workload = build_workload(text_token_ids, WorkloadSpec())
    chosen = subset(workload, 8, seed=3)
    assert chosen == subset(workload, 8, seed=3)
    assert len(chosen) == 8 and len(set(chosen)) == 8
    assert [workload.index(r) for r in chosen] == sorted(workload.index(r) for r in chosen)
    assert subset(workload, 500) == workload


def test_bad_specs_name_the_field():
    with pytest.raises(ValueError, match="max_input_len"):
        WorkloadSpec(min_input_len=300, max_input_len=200)
    with pytest.raises(ValueError, match="num_prompts"):
        WorkloadSpec(num_prompts=0)
    with pytest.raises(ValueError, match="dataset"):
        build_workload([1, 2, 3], WorkloadSpec())


def test_request_prompt_len():
    assert WorkloadRequest("r", (1, 2, 3), output_len=4).prompt_len == 3
