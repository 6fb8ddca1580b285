"""`kvpilot bench quant` end to end on a tiny checkpoint: one table row per requested mode."""

import argparse

import pytest
from kvpilot.serving.bench import quant


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    quant.add_parser(parser.add_subparsers())
    return parser.parse_args(["quant", *argv])


def test_bench_prints_a_row_per_mode(tiny_llama, capsys):
    args = _parse("--model", str(tiny_llama), "--modes", "none,int4 g64,kv int8", "--num-tokens", "64")
    assert args.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["mode", "weights", "MiB"]
    rows = {line.rsplit(maxsplit=5)[0].strip(): line.rsplit(maxsplit=5)[1:] for line in lines[2:]}
    assert list(rows) == ["none", "int4 g64", "kv int8"]
    weights = {mode: float(values[0]) for mode, values in rows.items()}
    blocks = {mode: int(values[1]) for mode, values in rows.items()}
    assert weights["int4 g64"] < weights["none"] == weights["kv int8"]
    assert blocks["kv int8"] > 3 * blocks["none"]
    assert all(float(values[2]) > 1 and float(values[4]) > 0 for values in rows.values())


def test_bench_rejects_unknown_modes(tiny_llama):
    args = _parse("--model", str(tiny_llama), "--modes", "int2")
    with pytest.raises(SystemExit, match="--modes"):
        args.run(args)
