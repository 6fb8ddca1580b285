"""`kvpilot bench throughput` end to end on the tiny Llama (both systems, tiny workload)."""

import re

import pytest
import torch
from kvpilot.serving.bench.throughput import random_workload
from kvpilot.serving.cli import main


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny matmuls: one intra-op thread is ~10x faster than two on a loaded 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_random_workload_is_seeded():
    first = random_workload(3, 5, 2, vocab_size=100, seed=7)
    assert first == random_workload(3, 5, 2, vocab_size=100, seed=7)
    assert first != random_workload(3, 5, 2, vocab_size=100, seed=8)
    assert [len(r.prompt_token_ids) for r in first] == [5, 5, 5] and {r.output_len for r in first} == {2}


def test_bench_throughput_prints_both_systems_and_their_ratio(tiny_llama, capsys):
    argv = ["bench", "throughput", "--model", str(tiny_llama), "--num-prompts", "3"]
    assert main([*argv, "--input-len", "6", "--output-len", "4", "--num-kv-blocks", "16"]) == 0
    table = capsys.readouterr().out
    row = r"^(kvpilot|transformers)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$"
    rows = {m[0]: m[1:] for m in re.findall(row, table, re.M)}
    assert set(rows) == {"kvpilot", "transformers"}
    for requests, tokens, seconds, rate in rows.values():
        assert (int(requests), int(tokens)) == (3, 12)
        # seconds are printed with 2 decimals: rate x seconds is 12 tokens up to that rounding
        assert abs(float(rate) * float(seconds) - 12) <= 0.006 * float(rate) + 0.1
    ratio = float(re.search(r"kvpilot / transformers\s+([\d.]+)x", table).group(1))
    expected = float(rows["kvpilot"][3]) / float(rows["transformers"][3])
    assert ratio == pytest.approx(expected, rel=0.05)
