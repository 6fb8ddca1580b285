"""What /proc/cpuinfo says about this CPU: kernel choices and benchmark reports read it."""

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


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


def splits_avx512(cpuinfo: str) -> bool:
    """AVX-512 executed as two 256-bit halves (AMD Zen 4: AuthenticAMD, cpu family 25, avx512f),
    so 256-bit FMAs reach the same peak there."""
    fields = cpuinfo_fields(cpuinfo)
    amd_family_25 = fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25"
    return amd_family_25 and "avx512f" in cpuinfo_flags(cpuinfo)
