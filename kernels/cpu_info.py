"""What /proc/cpuinfo says about this CPU: benchmark reports read it (serving/bench/machine.py)."""

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
