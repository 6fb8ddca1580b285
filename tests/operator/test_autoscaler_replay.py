"""`kvpilot autoscale replay`: the decision function over a samples file, the exact JSON lines, the
errors that name what is wrong, and the optional plot."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from kvpilot.serving.cli import main

MANIFEST = {
    "apiVersion": "kvpilot.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "chat"},
    "spec": {
        "model": {"name": "smollm2", "uri": "pvc://models/smollm2"},
        "autoscaling": {"minReplicas": 0, "maxReplicas": 8, "metric": "concurrency", "target": 2,
                        "stableWindow": "20s", "panicWindow": "4s", "scaleDownDelay": "10s",
                        "scaleToZeroAfter": "30s"},
    },
}  # fmt: skip


def samples() -> list[dict]:
    """Two quiet replicas, a burst to 12 in flight at t=40, quiet again at t=70, idle from t=100,
    a gap in the metrics at t=150, then requests queued at the router at zero."""
    lines = []
    for t in range(0, 220, 2):
        running = 12.0 if 40 <= t < 70 else 4.0 if t < 100 else 0.0
        line = {"t": t, "ready_replicas": 2, "running": running, "waiting": 0.0, "kv_cache_usage": 0.1}
        if t == 150:
            line = {"t": t, "ready_replicas": 2}
        if t >= 200:
            line = {"t": t, "ready_replicas": 0, "running": 0.0, "waiting": 0.0, "queued": 3.0}
        lines.append(line)
    return lines


@pytest.fixture
def files(tmp_path):
    manifest = tmp_path / "isvc.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    metrics = tmp_path / "samples.jsonl"
    metrics.write_text("".join(json.dumps(line) + "\n" for line in samples()))
    return manifest, metrics


def test_json_lines_follow_the_burst_the_idle_and_the_queue(files, capsys):
    manifest, metrics = files
    assert main(["autoscale", "replay", "-f", str(manifest), "--metrics", str(metrics), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    *changes, final = lines
    assert all(set(c) == {"t", "from", "to", "mode", "reason"} for c in changes)
    assert final == {"t": 218, "desired": 2}
    moves = [(c["t"], c["from"], c["to"], c["mode"]) for c in changes]
    # The burst: panic up within the panic window, 2 -> 4 -> 6 (12 in flight at 2 each).
    assert moves[:2] == [(40, 2, 4, "panic"), (42, 4, 6, "panic")]
    # Back down in stable mode once the panic and the scale-down delay are over; zero after 30 s idle.
    downs = [m for m in moves if m[2] < m[1]]
    assert downs and all(m[3] == "stable" for m in downs) and all(m[0] > 70 for m in downs)
    assert [m for m in moves if m[2] == 0] == [(128, 1, 0, "stable")]  # idle from t=98 + 30 s
    assert "scale to zero" in changes[moves.index((128, 1, 0, "stable"))]["reason"]
    # From zero, the router's queue brings one replica at once; 3 queued at 2 each then want 2.
    assert moves[-2:] == [(200, 0, 1, "stable"), (202, 1, 2, "panic")]
    assert "3 requests queued at the router at zero replicas: 1 at once" in changes[-2]["reason"]


def test_text_output_names_every_change_and_the_final_count(files, capsys):
    manifest, metrics = files
    assert main(["autoscale", "replay", "-f", str(manifest), "--metrics", str(metrics)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("t=40") and "2 -> 4" in out[0] and "panic" in out[0]
    assert out[-1] == "final: 2 replicas at t=218.0"


def test_help_says_open_loop(capsys):
    with pytest.raises(SystemExit):
        main(["autoscale", "replay", "--help"])
    assert (
        "Open-loop: the recorded ready_replicas and load are replayed as they were" in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"t": 0, "ready_replicas": -1}', "samples.jsonl:2: ready_replicas"),
        ('{"t": 0, "ready_replicas": 1, "kv_cache_usage": 1.5}', "samples.jsonl:2: kv_cache_usage"),
        ('{"t": 0, "ready_replicas": 1, "runing": 3}', "samples.jsonl:2: runing: Extra inputs"),
        ("not json", "samples.jsonl:2:"),
    ],
)
def test_a_bad_sample_is_named_by_its_line(files, capsys, line, message):
    manifest, metrics = files
    metrics.write_text('{"t": 0, "ready_replicas": 1}\n' + line + "\n")
    assert main(["autoscale", "replay", "-f", str(manifest), "--metrics", str(metrics)]) == 2
    assert message in capsys.readouterr().err


def test_a_manifest_without_autoscaling_says_so(files, capsys):
    manifest, metrics = files
    manifest.write_text(yaml.safe_dump({**MANIFEST, "spec": {"model": MANIFEST["spec"]["model"]}}))
    assert main(["autoscale", "replay", "-f", str(manifest), "--metrics", str(metrics)]) == 2
    assert "spec.autoscaling is not set" in capsys.readouterr().err


def test_plot_is_written_or_its_missing_library_named(files, tmp_path, capsys, monkeypatch):
    manifest, metrics = files
    png = tmp_path / "timeline.png"
    args = ["autoscale", "replay", "-f", str(manifest), "--metrics", str(metrics), "--plot", str(png)]
    pytest.importorskip("matplotlib")  # the bench extra; the branch below runs either way
    assert main(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as without the bench extra
    assert main(args) == 2
    assert "--plot needs matplotlib: pip install 'kvpilot[bench]'" in capsys.readouterr().err
