"""Where a benchmark ran: a performance figure means nothing without the CPU it ran on."""

import os
import platform
from pathlib import Path

# The CPU features that decide which kernels run (fbgemm, oneDNN, MKL, our C kernels).
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")
CPUINFO = Path("/proc/cpuinfo")
CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def read_cpuinfo(path: Path = CPUINFO) -> str:
    """/proc/cpuinfo's text, or "" where there is none (not Linux)."""
    return path.read_text() if path.exists() else ""


def cpuinfo_fields(cpuinfo: str) -> dict[str, str]:
    """The first CPU's `key: value` lines (vendor_id, cpu family, model, flags, ...)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpuinfo_flags(cpuinfo: str) -> set[str]:
    """Every flag the first CPU lists."""
    return set(cpuinfo_fields(cpuinfo).get("flags", "").split())


def cpu_model(cpuinfo: str) -> str:
    return cpuinfo_fields(cpuinfo).get("model name") or platform.processor() or "unknown"


def cpu_id(cpuinfo: str) -> str:
    """Vendor, family and model numbers: how to tell CPU generations apart where a hypervisor
    shortens the model name (ours say only "AMD EPYC": family 23 is Zen 2, 25 Zen 3 or 4)."""
    fields = cpuinfo_fields(cpuinfo)
    parts = [fields.get("vendor_id", "")]
    parts += [f"{name} {fields[name]}" for name in ("cpu family", "model", "stepping") if name in fields]
    return " ".join(part for part in parts if part) or "unknown"


def cpu_flags(cpuinfo: str) -> dict[str, bool]:
    present = all_cpu_flags(cpuinfo)
    return {flag: flag in present for flag in FLAGS}


def all_cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """Every flag /proc/cpuinfo lists for the first CPU."""
    return cpuinfo_flags(read_cpuinfo() if cpuinfo is None else cpuinfo)


def cpu_class(flags: dict[str, bool]) -> str:
    """The class our results are grouped by: what fbgemm's int8 kernel and oneDNN can use."""
    if flags.get("avx512_vnni"):
        return "avx512-vnni"
    if flags.get("avx512f"):
        return "avx512"
    return "avx2" if flags.get("avx2") else "x86-64"


def cache_bytes(size: str) -> int:
    """sysfs's cache size ("266240K", "32M", "512") in bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    size = size.strip()
    return int(size[:-1]) * units[size[-1]] if size[-1:] in units else int(size)


def largest_cache_bytes(caches: Path = CPU_CACHES) -> int:
    """The largest CPU cache Linux lists for CPU 0 (its last level), 0 where it lists none."""
    sizes = [cache_bytes(path.read_text()) for path in caches.glob("index*/size") if path.read_text().strip()]
    return max(sizes, default=0)


def machine_class() -> str:
    """This machine's CPU class (names the committed results file)."""
    return cpu_class(cpu_flags(read_cpuinfo()))


def describe_machine(cpuinfo_path: Path = CPUINFO) -> dict:
    """CPU model, cores, ISA flags, torch version and threads, and the float32 and int8 GEMM paths."""
    import torch
    from kvpilot.kernels.cpu_extension import int8_panel_instruction
    from kvpilot.kernels.native_build import march
    from kvpilot.kernels.packed_float import float_gemm
    from kvpilot.kernels.quant.int8 import one_pass_int8_is_exact, use_int8_panels, use_onednn_int8

    cpuinfo = read_cpuinfo(cpuinfo_path)
    flags = cpu_flags(cpuinfo)
    return {
        "cpu": cpu_model(cpuinfo),
        "cpu_id": cpu_id(cpuinfo),
        "cpu_class": cpu_class(flags),
        "cores": len(os.sched_getaffinity(0)),
        "flags": flags,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "w8a8_one_pass_exact": one_pass_int8_is_exact(),
        "int8_gemm": "panels" if use_int8_panels() else "onednn" if use_onednn_int8() else "fbgemm",
        "int8_panel_instruction": int8_panel_instruction() if use_int8_panels() else None,
        "float_gemm": float_gemm(),
        "kernels_march": march(),
    }


def format_machine(machine: dict) -> str:
    flags = " ".join(name for name, present in machine["flags"].items() if present) or "none"
    if machine.get("int8_gemm") == "panels":
        gemm = f"kvpilot panels ({machine.get('int8_panel_instruction') or 'vpdpbusd'}, exact)"
    elif machine.get("int8_gemm") == "onednn":  # results recorded before oneDNN's GEMM have no key
        gemm = "oneDNN int8 (exact)"
    else:
        gemm = f"fbgemm, {'one 8-bit pass' if machine['w8a8_one_pass_exact'] else 'two 7-bit passes'}"
    float_gemm = {"panels": "kvpilot panels", "onednn": "oneDNN"}.get(machine.get("float_gemm"), "oneDNN")
    march = machine.get("kernels_march", "native")
    built_for = "" if march == "native" else f"; C kernels built for -march={march}, not this CPU"
    return (
        f"machine: {machine['cpu']} [{machine.get('cpu_id', 'unknown')}] ({machine['cpu_class']}), "
        f"{machine['cores']} cores, flags: {flags}; "
        f"torch {machine['torch']}, {machine['torch_threads']} threads; "
        f"float32 GEMM: {float_gemm}; int8 GEMM: {gemm}{built_for}"
    )
