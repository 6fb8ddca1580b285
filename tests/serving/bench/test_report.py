import json

import pytest
from kvpilot.serving.bench.report import (
    SystemResult,
    build_report,
    format_table,
    plot_concurrency,
    write_json,
)

ALL = {
    "kvpilot_fp32": SystemResult("fp32", 128, 30_000, 100.0),  # 300 tok/s
    "kvpilot_best": SystemResult("int8", 128, 30_000, 50.0),  # 600 tok/s
    "hf_sequential": SystemResult("fp32", 8, 2_000, 100.0),  # 20 tok/s
    "hf_static_batch": SystemResult("fp32", 64, 15_000, 100.0),  # 150 tok/s
    "llama_cpp": SystemResult("q4_1", 128, 30_000, 75.0),  # 400 tok/s
}
ROOFLINE = {"tokens_per_s": 500.0}


def test_full_report_schema_and_ratios(tmp_path):
    report = build_report(ALL, ROOFLINE)
    assert set(report) == {"systems", "roofline", "machine", "details", "ratios"}
    assert list(report["systems"]) == list(ALL)
    assert report["systems"]["kvpilot_best"]["output_tokens_per_s"] == pytest.approx(600.0)
    assert report["systems"]["kvpilot_best"]["mode"] == "int8"
    assert report["ratios"] == pytest.approx(
        {
            "fp32_vs_hf_sequential": 15.0,
            "best_vs_hf_sequential": 30.0,
            "best_vs_hf_static_batch": 4.0,
            "best_vs_llama_cpp": 1.5,
        }
    )
    path = tmp_path / "report.json"
    write_json(report, path)
    assert json.loads(path.read_text()) == report


def test_systems_that_did_not_run_are_absent_with_their_ratios():
    ran = {name: ALL[name] for name in ("kvpilot_fp32", "kvpilot_best", "hf_sequential")}
    report = build_report(ran, ROOFLINE)
    assert set(report["systems"]) == set(ran)
    assert set(report["ratios"]) == {"fp32_vs_hf_sequential", "best_vs_hf_sequential"}

    report = build_report({"kvpilot_fp32": ALL["kvpilot_fp32"]}, ROOFLINE)
    assert report["ratios"] == {}


def test_unknown_system_is_rejected():
    with pytest.raises(ValueError, match="systems"):
        build_report({"vllm": ALL["kvpilot_fp32"]}, ROOFLINE)


def test_table_shows_rates_roofline_share_and_ratios():
    table = format_table(build_report(ALL, ROOFLINE))
    kvpilot_fp32 = next(line for line in table.splitlines() if line.startswith("kvpilot_fp32"))
    assert "300.0" in kvpilot_fp32 and "60.0%" in kvpilot_fp32
    assert "best_vs_llama_cpp" in table and "1.50x" in table
    assert "fp32 roofline" in table and "500.0" in table


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "throughput.png"
    plot_concurrency({"kvpilot_fp32": {1: 20.0, 8: 120.0, 32: 250.0, 128: 300.0}, "hf": {1: 20.0}}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
