"""Building the native CPU kernels (kernels/csrc) into a cached shared library, without torch.

Torch-free so that `kvpilot serve` can start the build in a background thread before it imports
torch and loads the model (`prebuild_in_background`): on a pod's first start, whose cache is an
empty emptyDir, the compilers then run while Python imports, not after. `cpu_extension.load()`
waits for that build (or runs it) through `ensure_built`, which builds each library once per
process. Built for this CPU (`-march=native`) unless KVPILOT_MARCH names another gcc `-march`.
"""

import atexit
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
SOURCES = [
    CSRC / name
    for name in (
        "paged_decode_attention.c",
        "int8_quantize.c",
        "kv_cache_write.c",
        "row_ops.c",
        "packed_sgemm.c",
        "packed_int8.c",
        "decode_stack.c",
    )
]
HEADERS = [CSRC / name for name in ("vector_exp.h", "cache_layout.h", "kernels.h")]
MARCH_ENV = "KVPILOT_MARCH"
# Reassociation lets the compiler vectorize the dot products; infinities keep their meaning.
OPTIMIZATION = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]
logger = logging.getLogger(__name__)
_lock = threading.Lock()
_in_flight: dict[Path, list[subprocess.Popen]] = {}  # a build's scratch folder -> its compilers


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvpilot" / "kernels"


def march() -> str:
    """The CPU the kernels are built for: KVPILOT_MARCH, else this one ("native")."""
    return os.environ.get(MARCH_ENV) or "native"


def compiler_flags() -> list[str]:
    return [*OPTIMIZATION, f"-march={march()}", "-fopenmp", "-shared", "-fPIC"]


def library_path() -> Path:
    """Where the library for these sources and flags is cached (a hash of both in its name)."""
    sources = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    digest = hashlib.sha256(sources + " ".join(compiler_flags()).encode()).hexdigest()[:16]
    return cache_dir() / f"kvpilot-cpu-{digest}.so"


def ensure_built() -> Path:
    """The library's path, built first if it is not cached. Raises OSError (no compiler, a
    read-only cache) or CalledProcessError (a compiler error, with its stderr)."""
    library = library_path()
    with _lock:  # one build at a time in this process (the background one, then a waiting load)
        if not library.exists():
            _build(library, compiler_flags())
    return library


def prebuild_in_background() -> threading.Thread:
    """Starts `ensure_built` in a daemon thread; a failure is left for `cpu_extension.load()`
    to report (it builds again and logs why the torch paths are used)."""

    def build() -> None:
        try:
            ensure_built()
        except (OSError, subprocess.CalledProcessError):
            logger.debug("native kernels: background build failed; load() will report it")

    thread = threading.Thread(target=build, name="kvpilot-kernel-build", daemon=True)
    thread.start()
    return thread


def _build(library: Path, flags: list[str]) -> None:
    """Each source compiled by its own `cc -c`, all at once (a pod's cold start waits for the
    slowest file, not the sum), then linked."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        scratch = Path(tmp)
        objects = [scratch / f"{source.stem}.o" for source in SOURCES]
        _in_flight[scratch] = compilers = []
        try:
            for source, obj in zip(SOURCES, objects, strict=True):
                compilers.append(_start(["cc", *flags, "-c", str(source), "-o", str(obj)]))
            for compiler in compilers:
                stdout, stderr = compiler.communicate()
                if compiler.returncode:
                    raise subprocess.CalledProcessError(compiler.returncode, compiler.args, stdout, stderr)
            built = scratch / library.name
            linker = _start(["cc", *flags, *map(str, objects), "-o", str(built), "-lm"])
            compilers.append(linker)
            stdout, stderr = linker.communicate()
            if linker.returncode:
                raise subprocess.CalledProcessError(linker.returncode, linker.args, stdout, stderr)
            os.replace(built, library)  # atomic: concurrent builders never see a partial file
        finally:
            _stop(compilers)  # those still running after one failed
            del _in_flight[scratch]


def _start(command: list[str]) -> subprocess.Popen:
    """A compiler in its own process group, so that stopping it also stops cc1 and as."""
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0)


def _stop(compilers: list[subprocess.Popen]) -> None:
    for compiler in compilers:
        if compiler.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(compiler.pid, signal.SIGKILL)
            compiler.wait()


@atexit.register
def _abandon_builds() -> None:
    """The process is exiting during a build (`kvpilot serve` failed while the background build
    ran): no compilers left running as orphans, no scratch folder left in the cache."""
    for scratch, compilers in list(_in_flight.items()):
        _stop(compilers)
        shutil.rmtree(scratch, ignore_errors=True)
