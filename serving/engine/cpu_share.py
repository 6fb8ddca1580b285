"""CPU threads that follow the cores this engine actually gets.

The matmul libraries split every op statically over their OpenMP threads, and a step is
hundreds of short ops. When another process takes a core, the thread scheduled there is
descheduled for whole time slices and every op waits for it at a barrier: with 2 threads on 2
cores and one core busy, throughput fell to 0.14x of idle, while 1 thread kept 0.58x. So every second
the engine measures how much CPU the *other* processes use (/proc/stat minus its own time) and
runs with as many threads as there are cores left (at least 1, at most what it started with).
"""

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuSample:
    wall_s: float  # monotonic clock
    machine_busy_s: float  # CPU time of every process on the machine (all cores, summed)
    own_busy_s: float  # this process's CPU time


def threads_for_share(cores: int, others_busy_cores: float, max_threads: int, current: int) -> int:
    """One thread per core the other processes leave free. A core counts as taken when others
    use more than half of it, and as free again only when they use less than a quarter of it
    (so the count does not flap around one half)."""
    free = cores - max(0.0, others_busy_cores)
    down, up = math.floor(free + 0.5), math.floor(free + 0.25)
    wanted = down if down < current else max(current, up)
    return max(1, min(max_threads, wanted))


def others_busy_cores(before: CpuSample, after: CpuSample) -> float:
    wall = after.wall_s - before.wall_s
    if wall <= 0:
        raise ValueError("samples: `after` must be later than `before`")
    others = (after.machine_busy_s - before.machine_busy_s) - (after.own_busy_s - before.own_busy_s)
    return max(0.0, others / wall)


def read_sample(stat: Path = Path("/proc/stat")) -> CpuSample | None:
    """Now, or None where /proc/stat does not exist (not Linux)."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    jiffies = [int(value) for value in fields[1:]]
    idle = jiffies[3] + (jiffies[4] if len(jiffies) > 4 else 0)  # idle + iowait
    steal = jiffies[7] if len(jiffies) > 7 else 0  # another VM's time: not ours to use either
    busy = (sum(jiffies[:8]) - idle - steal) / os.sysconf("SC_CLK_TCK")
    return CpuSample(time.monotonic(), busy, time.process_time())


class CpuShare:
    """Call `adjust()` once per engine step; it re-measures at most every `interval_s`."""

    def __init__(
        self,
        max_threads: int,
        set_threads: Callable[[int], None],
        interval_s: float = 1.0,
        sample: Callable[[], CpuSample | None] = read_sample,
        cores: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_threads = max_threads
        self.threads = max_threads
        self.cores = cores or len(os.sched_getaffinity(0))
        self._set_threads = set_threads
        self._sample = sample
        self._interval_s = interval_s
        self._clock = clock
        self._last = sample()

    def adjust(self) -> int:
        """The thread count now in use (changed when the share of free cores changed)."""
        if self._last is None or self.max_threads <= 1:
            return self.threads
        if self._clock() - self._last.wall_s < self._interval_s:
            return self.threads  # the step loop pays one clock read, not a /proc read
        now = self._sample()
        if now is None:
            return self.threads
        others = others_busy_cores(self._last, now)
        self._last = now
        wanted = threads_for_share(self.cores, others, self.max_threads, self.threads)
        if wanted != self.threads:
            logger.info(
                "CPU threads %d -> %d: other processes use %.1f of %d cores",
                self.threads,
                wanted,
                others,
                self.cores,
            )
            self._set_threads(wanted)
            self.threads = wanted
        return self.threads
