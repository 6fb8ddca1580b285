"""CPU threads follow the cores other processes leave free."""

import subprocess
import sys
import time

import pytest
from kvpilot.serving.engine.cpu_share import (
    CpuSample,
    CpuShare,
    others_busy_cores,
    read_sample,
    threads_for_share,
)


@pytest.mark.parametrize(
    ("cores", "others", "max_threads", "current", "expected"),
    [
        (2, 0.0, 2, 2, 2),  # idle machine: every thread
        (2, 0.3, 2, 2, 2),  # a little background noise does not cost a thread
        (2, 0.6, 2, 2, 1),  # more than half a core taken: that core is gone
        (2, 1.0, 2, 2, 1),
        (2, 2.0, 2, 2, 1),  # never fewer than one
        (2, 0.5, 2, 1, 1),  # half a core still used by others: stay down (no flapping)
        (2, 0.3, 2, 1, 1),
        (2, 0.2, 2, 1, 2),  # under a quarter: the core is free again
        (8, 3.2, 8, 8, 5),
        (8, 3.3, 8, 4, 4),  # others use 0.3 of a fifth core: not yet free
        (8, 0.0, 4, 4, 4),  # never more than the engine started with
        (2, -0.1, 2, 2, 2),  # clock noise can make the difference slightly negative
    ],
)
def test_threads_for_share(cores, others, max_threads, current, expected):
    assert threads_for_share(cores, others, max_threads, current) == expected


def test_others_are_the_machine_minus_this_process():
    before = CpuSample(wall_s=10.0, machine_busy_s=100.0, own_busy_s=40.0)
    after = CpuSample(wall_s=12.0, machine_busy_s=105.0, own_busy_s=43.0)
    assert others_busy_cores(before, after) == pytest.approx(1.0)  # (5 - 3) s of CPU over 2 s
    with pytest.raises(ValueError, match="later"):
        others_busy_cores(after, before)


class FakeClock:
    def __init__(self):
        self.samples = [CpuSample(0.0, 0.0, 0.0)]

    def __call__(self) -> CpuSample:
        return self.samples[-1]

    def advance(self, wall_s: float, others_s: float, own_s: float) -> None:
        last = self.samples[-1]
        self.samples.append(
            CpuSample(last.wall_s + wall_s, last.machine_busy_s + others_s + own_s, last.own_busy_s + own_s)
        )


def test_controller_drops_a_thread_while_a_core_is_taken_and_takes_it_back():
    clock, applied = FakeClock(), []
    reads = []

    def sample():
        reads.append(clock())
        return clock()

    share = CpuShare(2, applied.append, interval_s=1.0, sample=sample, cores=2, clock=lambda: clock().wall_s)
    clock.advance(0.5, others_s=0.5, own_s=1.0)
    assert share.adjust() == 2 and applied == []  # less than an interval: not measured yet
    assert len(reads) == 1  # only the first sample: /proc/stat is not read on every step
    clock.advance(0.5, others_s=0.5, own_s=1.0)  # over 1 s: others used 1 core
    assert share.adjust() == 1 and applied == [1]
    clock.advance(1.0, others_s=1.0, own_s=1.0)
    assert share.adjust() == 1 and applied == [1]  # unchanged: no call
    clock.advance(1.0, others_s=0.0, own_s=1.0)  # the other process ended
    assert share.adjust() == 2 and applied == [1, 2]


def test_read_sample_sees_another_process_burn_a_core():
    first = read_sample()
    if first is None:
        pytest.skip("no /proc/stat on this platform")
    burner = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"]
    )
    try:
        time.sleep(1.2)
        second = read_sample()
    finally:
        burner.wait(timeout=10)
    assert others_busy_cores(first, second) > 0.5
