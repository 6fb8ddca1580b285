"""`kvpilot bench int8-gemm`: one timing per (shape, rows) and GEMM, and clear errors."""

import pytest
from kvpilot.kernels.quant.int8 import use_int8_panels, use_onednn_int8
from kvpilot.serving.bench.int8_gemm import parse_shapes
from kvpilot.serving.cli import main as cli_main


def test_prints_a_row_per_shape_and_row_count(capsys):
    args = ["bench", "int8-gemm", "--shapes", "64x32,128x16", "--rows", "1,8", "--repeats", "2"]
    assert cli_main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("machine: ") and "int8 GEMM: " in lines[0]
    header, *rows = lines[2:]
    gemms = ["fbgemm"] + (["onednn"] if use_onednn_int8() else []) + (["panels"] if use_int8_panels() else [])
    columns = [f"{mode} {gemm}" for gemm in gemms for mode in ("w8a8", "int8")] + ["fp32"]
    assert all(column in header for column in columns)
    assert [row.split()[:4] for row in rows] == [
        ["64", "x", "32", "1"],
        ["64", "x", "32", "8"],
        ["128", "x", "16", "1"],
        ["128", "x", "16", "8"],
    ]
    assert all(len(row.split()) == 4 + len(columns) and float(row.split()[-1]) > 0 for row in rows)


@pytest.mark.parametrize("text", ["64", "64x", "0x8", "axb"])
def test_bad_shapes_name_the_flag(text):
    with pytest.raises(SystemExit, match="--shapes"):
        parse_shapes(text)
