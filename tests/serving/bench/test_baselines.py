import pytest
from kvpilot.serving.bench.baselines import load_hf_model, run_hf_sequential, run_hf_static_batch
from kvpilot.serving.bench.workload import WorkloadRequest, total_output_tokens

REQUESTS = [
    WorkloadRequest("a", (5, 17, 300, 2, 9), output_len=6),
    WorkloadRequest("b", (44, 8), output_len=3),
    WorkloadRequest("c", tuple(range(100, 112)), output_len=9),
]


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    return load_hf_model(tiny_llama)


def test_sequential_generates_exactly_the_requested_tokens(hf_model):
    # Token 2 is the tiny model's EOS; every request must still run to its output_len.
    result = run_hf_sequential(hf_model, REQUESTS)
    assert (result.num_requests, result.output_tokens) == (3, total_output_tokens(REQUESTS))
    assert result.mode == "fp32" and result.output_tokens_per_s > 0


def test_static_batches_pad_left_and_count_only_requested_tokens(hf_model):
    result = run_hf_static_batch(hf_model, REQUESTS, batch_size=2)
    assert (result.num_requests, result.output_tokens) == (3, 18)
    with pytest.raises(ValueError, match="batch_size"):
        run_hf_static_batch(hf_model, REQUESTS, batch_size=0)
