"""Where a benchmark ran: CPU model, flags and class read from /proc/cpuinfo's text."""

from kvpilot.kernels.packed_float import float_gemm
from kvpilot.serving.bench.machine import (
    cache_bytes,
    cpu_class,
    cpu_flags,
    cpu_id,
    cpu_model,
    describe_machine,
    format_machine,
    largest_cache_bytes,
)

ZEN3 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
    "model name\t: AMD EPYC 7B13\nstepping\t: 1\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
    "processor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
)
ZEN4 = "model name\t: AMD EPYC 9B14\nflags\t\t: avx2 fma avx512f avx512_vnni avx512_bf16\n"


def test_cpu_class_and_flags_from_cpuinfo():
    assert cpu_model(ZEN3) == "AMD EPYC 7B13"
    assert cpu_flags(ZEN3)["avx2"] and not cpu_flags(ZEN3)["avx512_vnni"]
    assert cpu_class(cpu_flags(ZEN3)) == "avx2"
    assert cpu_class(cpu_flags(ZEN4)) == "avx512-vnni"
    assert cpu_class(cpu_flags("flags\t: avx512f avx2\n")) == "avx512"
    assert cpu_class(cpu_flags("")) == "x86-64"
    assert cpu_id(ZEN3) == "AuthenticAMD cpu family 25 model 1 stepping 1"
    assert cpu_id(ZEN4) == cpu_id("") == "unknown"


def test_describe_machine_reads_the_given_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN3)
    machine = describe_machine(path)
    assert (machine["cpu"], machine["cpu_class"]) == ("AMD EPYC 7B13", "avx2")
    assert machine["cores"] >= 1 and isinstance(machine["w8a8_one_pass_exact"], bool)
    assert machine["int8_gemm"] in ("panels", "onednn", "fbgemm")
    assert machine["cpu_id"] == "AuthenticAMD cpu family 25 model 1 stepping 1"
    assert "[AuthenticAMD cpu family 25 model 1 stepping 1] (avx2)" in format_machine(machine)
    assert "int8 GEMM: " in format_machine(machine)
    if machine["int8_gemm"] == "panels":  # which instruction ran them
        instruction = machine["int8_panel_instruction"]
        assert instruction in ("vpdpbusd", "vpmaddwd")
        assert f"int8 GEMM: kvpilot panels ({instruction}, exact)" in format_machine(machine)
    assert machine["float_gemm"] == float_gemm()  # the float32 kernel the engine uses here
    named = {"panels": "float32 GEMM: kvpilot panels", "onednn": "float32 GEMM: oneDNN"}
    assert named[float_gemm()] in format_machine(machine)


def test_a_build_for_another_cpu_is_named(tmp_path, monkeypatch):
    """KVPILOT_MARCH: results of the AVX2 build on an AVX-512 machine must not pass for native ones."""
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN3)
    monkeypatch.delenv("KVPILOT_MARCH", raising=False)
    native = describe_machine(path)
    assert native["kernels_march"] == "native"
    assert "C kernels built for" not in format_machine(native)
    monkeypatch.setenv("KVPILOT_MARCH", "znver2")
    machine = describe_machine(path)
    assert machine["kernels_march"] == "znver2"
    assert "C kernels built for -march=znver2, not this CPU" in format_machine(machine)


def test_cache_sizes_read_as_sysfs_writes_them(tmp_path):
    assert [cache_bytes(s) for s in ("266240K\n", "32M", "1G", "512")] == [
        266240 << 10,
        32 << 20,
        1 << 30,
        512,
    ]
    for index, size in enumerate(("48K", "2048K", "266240K")):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert largest_cache_bytes(tmp_path) == 266240 << 10
    assert largest_cache_bytes(tmp_path / "missing") == 0
