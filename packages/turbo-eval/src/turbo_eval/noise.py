"""Speed ratios with their uncertainty, and a flag when the measurement is noise.

A throughput ratio is timed in rounds: each round runs the reference and the method once,
back to back (:func:`turbo_eval.measure.interleaved_throughput`), so the per-round ratios
``t_reference / t_method`` are paired. :func:`speed_ratio` gives their geometric mean with a
paired bootstrap interval (in log space, as the Stable Diffusion benchmark does) and flags the
figure when

- the rounds disagree: the per-round ratios spread by more than ``spread_threshold`` of their
  median ((max - min) / median), or
- the machine's load changed during the run: the 1-minute load average (``os.getloadavg``)
  moved by more than ``load_threshold`` between the start and the end, or
- the machine was busy: other processes used more than ``busy_threshold`` of a core on
  average while the rounds ran (:class:`CpuWindow`: the machine's busy CPU time less this
  process's, over the wall time; psutil). Where that was not read, the 1-minute load
  average less the run's own torch threads stands in for it (and without the thread count,
  the load average above the CPU count).

The defaults come from the default suite run on this project's 2-core machine: idle, its
rounds spread by 16-43 % ((max - min) / median of 5 rounds), and the load average stood at
2.1-2.8 from the run's own threads (torch's two, plus the tokenizer's pool in the text
task), which is why the load average alone cannot tell the run from other work; beside
parallel work the rounds spread by 140-200 % at load 6-8.

A flagged figure is printed with ``!`` and the reasons, so a table measured on a busy machine
says so.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

__all__ = [
    "DEFAULT_BUSY_THRESHOLD",
    "DEFAULT_LOAD_THRESHOLD",
    "DEFAULT_SPREAD_THRESHOLD",
    "CpuWindow",
    "SpeedRatio",
    "format_ratio",
    "load_average",
    "speed_ratio",
]

#: rounds disagree when (max - min) / median of the per-round ratios exceeds this (an idle
#: 2-core machine spreads up to ~0.45 over 5 rounds: below that it is not noise)
DEFAULT_SPREAD_THRESHOLD = 0.5
#: the load changed when the 1-minute load average moved by more than this
DEFAULT_LOAD_THRESHOLD = 1.0
#: busy when other processes used more than this many cores on average during the rounds
DEFAULT_BUSY_THRESHOLD = 0.5


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none (Windows)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


class CpuWindow:
    """How much CPU other processes used between :meth:`start` and :meth:`other_cores`.

    The machine's busy CPU seconds (``psutil.cpu_times``: all but idle, iowait and the guest
    times Linux already counts in user) less this process's own (all its threads), over the
    wall time: 0 on an idle machine whatever this process runs, about 1 with one CPU burner
    beside it. None where psutil is not installed.
    """

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            import psutil
        except ImportError:
            return None
        times = psutil.cpu_times()
        skip = {"idle", "iowait", "guest", "guest_nice"}
        busy = sum(v for k, v in times._asdict().items() if k not in skip)
        own = psutil.Process().cpu_times()
        return time.perf_counter(), busy, own.user + own.system

    def other_cores(self) -> float | None:
        """Other processes' mean CPU use since construction, in cores (>= 0)."""
        end = self._read()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        wall = end[0] - self._start[0]
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return max(0.0, other / wall)


@dataclasses.dataclass(frozen=True)
class SpeedRatio:
    """``t_reference / t_method`` over paired rounds.

    Attributes:
        ratio: geometric mean over rounds (> 1: the method is faster).
        low, high: its paired bootstrap 95 % interval over rounds (equal to ``ratio`` for
            one round).
        rounds: how many rounds.
        spread: (max - min) / median of the per-round ratios.
        load_before, load_after: 1-minute load average at the start and the end (None when
            not read).
        other_cores: other processes' mean CPU use during the rounds, in cores (None when
            not read).
        flags: why the figure is noise (empty when it is not): ``"rounds disagree"``,
            ``"load changed"``, ``"busy"``.
    """

    ratio: float
    low: float
    high: float
    rounds: int
    spread: float
    load_before: float | None = None
    load_after: float | None = None
    flags: tuple[str, ...] = ()
    other_cores: float | None = None

    @property
    def noisy(self) -> bool:
        return bool(self.flags)

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes 1 (the method is resolved faster or slower)."""
        return self.low > 1 or self.high < 1

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "flags": list(self.flags), "noisy": self.noisy}


def _check_seconds(name: str, seconds: Sequence[float]) -> list[float]:
    values = [float(t) for t in seconds]
    if not values:
        raise ValueError(f"{name} must hold at least one round's time")
    if not all(math.isfinite(t) and t > 0 for t in values):
        raise ValueError(f"{name} must be finite times > 0 s, got {values}")
    return values


def speed_ratio(
    reference_seconds: Sequence[float],
    method_seconds: Sequence[float],
    load_before: float | None = None,
    load_after: float | None = None,
    spread_threshold: float = DEFAULT_SPREAD_THRESHOLD,
    load_threshold: float = DEFAULT_LOAD_THRESHOLD,
    cpu_count: int | None = None,
    own_threads: int | None = None,
    busy_threshold: float = DEFAULT_BUSY_THRESHOLD,
    other_cores: float | None = None,
) -> SpeedRatio:
    """How much faster the method ran than the reference, round by round.

    Args:
        reference_seconds, method_seconds: time of each round, paired by position.
        load_before, load_after: 1-minute load averages around the whole timing.
        spread_threshold: flag when (max - min) / median of the per-round ratios exceeds it
            (> 0).
        load_threshold: flag when the load average moved by more than this (> 0).
        cpu_count: the machine's CPUs; default ``os.cpu_count()``.
        own_threads: the threads the timed run used (``torch.get_num_threads()``); the load
            they add is not other work. None: flag "busy" when a load average exceeds
            ``cpu_count``.
        busy_threshold: flag "busy" when ``other_cores`` exceeds this (> 0); without
            ``other_cores``, when a load average less ``min(own_threads, cpu_count)`` does.
        other_cores: other processes' mean CPU use during the rounds (:class:`CpuWindow`).

    Raises:
        ValueError: unpaired or non-positive times, or a threshold <= 0 (named).
    """
    reference = _check_seconds("reference_seconds", reference_seconds)
    method = _check_seconds("method_seconds", method_seconds)
    if len(reference) != len(method):
        raise ValueError(
            f"reference_seconds and method_seconds must pair up round by round, got "
            f"{len(reference)} and {len(method)} rounds"
        )
    if own_threads is not None and (
        isinstance(own_threads, bool) or not isinstance(own_threads, int) or own_threads < 1
    ):
        raise ValueError(f"own_threads must be None or an int >= 1, got {own_threads!r}")
    for name, value in (
        ("spread_threshold", spread_threshold),
        ("load_threshold", load_threshold),
        ("busy_threshold", busy_threshold),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    ratios = [a / b for a, b in zip(reference, method, strict=True)]
    median = statistics.median(ratios)
    spread = (max(ratios) - min(ratios)) / median
    if len(ratios) < 2:
        ratio = low = high = ratios[0]
    else:
        from .stats import paired_difference

        logs = paired_difference([math.log(t) for t in reference], [math.log(t) for t in method])
        ratio, low, high = math.exp(logs.mean), math.exp(logs.low), math.exp(logs.high)
    flags = []
    if spread > spread_threshold:
        flags.append("rounds disagree")
    if (
        load_before is not None
        and load_after is not None
        and abs(load_after - load_before) > load_threshold
    ):
        flags.append("load changed")
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    loads = [x for x in (load_before, load_after) if x is not None]
    if other_cores is not None:
        if other_cores > busy_threshold:
            flags.append("busy")
    elif loads:
        # the run's own threads load the machine too: only the rest is other work
        other_work = max(loads) - (cpus if own_threads is None else min(own_threads, cpus))
        if other_work > (0.0 if own_threads is None else busy_threshold):
            flags.append("busy")
    return SpeedRatio(
        ratio, low, high, len(ratios), spread, load_before, load_after, tuple(flags), other_cores
    )


def format_ratio(figure: SpeedRatio | dict[str, Any] | None, detail: bool = True) -> str:
    """``1.23x [1.10, 1.35]``, plus ``! rounds disagree 31%, load 2.1->6.3`` when noisy."""
    if figure is None:
        return "-"
    if isinstance(figure, dict):
        fields = {f.name for f in dataclasses.fields(SpeedRatio)}
        figure = SpeedRatio(**{k: v for k, v in figure.items() if k in fields})
        figure = dataclasses.replace(figure, flags=tuple(figure.flags))
    text = f"{figure.ratio:.2f}x"
    if figure.rounds > 1:
        text += f" [{figure.low:.2f}, {figure.high:.2f}]"
    if not figure.noisy:
        return text
    if not detail:
        return text + " !"
    reasons = []
    for flag in figure.flags:
        if flag == "rounds disagree":
            reasons.append(f"rounds disagree {100 * figure.spread:.0f}%")
        elif flag == "busy" and figure.other_cores is not None:
            reasons.append(f"other work {figure.other_cores:.1f} cores")
        elif flag in ("load changed", "busy") and figure.load_before is not None:
            load = f"load {figure.load_before:.1f}->{figure.load_after:.1f}"
            if load not in reasons:
                reasons.append(load)
    return f"{text} ! {', '.join(reasons)}"
