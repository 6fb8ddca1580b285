"""`kvpilot bench throughput` end to end on the tiny Llama: every system that can run, one tiny workload."""

import json

import pytest
import torch
from kvpilot.serving.bench.report import RATIOS
from kvpilot.serving.cli import main


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny matmuls: one intra-op thread is much faster than two on a loaded 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_report_json_table_and_plot(tiny_llama, tmp_path, capsys):
    report_path, plot_path = tmp_path / "report.json", tmp_path / "plot.png"
    argv = ["bench", "throughput", "--model", str(tiny_llama), "--num-prompts", "4", "--input-len", "8"]
    argv += ["--output-len", "3", "--hf-sequential-prompts", "2", "--hf-static-prompts", "3"]
    argv += ["--hf-batch-size", "2", "--kv-cache-memory-bytes", str(1 << 24)]
    argv += ["--json", str(report_path)]
    if _has_matplotlib():
        argv += ["--plot", str(plot_path), "--plot-concurrencies", "1,2"]
    assert main(argv) == 0

    report = json.loads(report_path.read_text())
    systems = report["systems"]
    # llama.cpp needs a .gguf file (and the optional package): absent here, and so is its ratio.
    assert set(systems) == {"kvpilot_fp32", "kvpilot_best", "hf_sequential", "hf_static_batch"}
    assert (systems["kvpilot_fp32"]["mode"], systems["kvpilot_best"]["mode"]) == ("fp32", "w8a8 + kv int8")
    expected = {
        "kvpilot_fp32": (4, 12),
        "kvpilot_best": (4, 12),
        "hf_sequential": (2, 6),
        "hf_static_batch": (3, 9),
    }
    for name, (requests, tokens) in expected.items():
        entry = systems[name]
        assert (entry["num_requests"], entry["output_tokens"]) == (requests, tokens)
        assert entry["output_tokens_per_s"] == pytest.approx(tokens / entry["elapsed_s"])
    assert set(report["ratios"]) == set(RATIOS) - {"best_vs_llama_cpp"}
    rate = {name: entry["output_tokens_per_s"] for name, entry in systems.items()}
    assert report["ratios"]["best_vs_hf_static_batch"] == pytest.approx(
        rate["kvpilot_best"] / rate["hf_static_batch"]
    )
    assert report["roofline_tokens_per_s"] > 0

    table = capsys.readouterr().out
    assert "fp32 roofline" in table and "fp32_vs_hf_sequential" in table
    if _has_matplotlib():
        assert plot_path.read_bytes()[:4] == b"\x89PNG"


def test_systems_flag_runs_only_those(tiny_llama, tmp_path):
    report_path = tmp_path / "report.json"
    argv = ["bench", "throughput", "--model", str(tiny_llama), "--num-prompts", "2", "--input-len", "8"]
    argv += ["--output-len", "2", "--systems", "kvpilot_fp32", "--kv-cache-memory-bytes", str(1 << 24)]
    assert main([*argv, "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert list(report["systems"]) == ["kvpilot_fp32"] and report["ratios"] == {}


def test_bad_flags_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "throughput", "--systems", "kvpilot_fp32,vllm"])
    assert "--systems" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--model"):
        main(["bench", "throughput", "--model", "/no/such/model"])


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_llama_cpp_baseline_generates_every_requested_token(default_gguf):
    """Runs where the optional llama-cpp-python is installed (not a CI dependency)."""
    pytest.importorskip("llama_cpp")
    from kvpilot.serving.bench.baselines import run_llama_cpp
    from kvpilot.serving.bench.workload import WorkloadRequest

    requests = [WorkloadRequest("a", (1, 2, 3, 4), output_len=5), WorkloadRequest("b", (5, 6), output_len=3)]
    result = run_llama_cpp(default_gguf, requests, concurrency=2)
    assert (result.mode, result.num_requests, result.output_tokens) == ("q4_1", 2, 8)
