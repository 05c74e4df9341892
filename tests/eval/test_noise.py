"""Speed ratios with intervals over rounds and the noise flag (turbo_eval.noise) and where
they show: interleaved_throughput's load readings, `bench`'s table and the report's table."""

from __future__ import annotations

import math
import time

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from turbo_eval.commands.report import Row, _speed_figure, markdown_table
from turbo_eval.measure import interleaved_throughput
from turbo_eval.noise import CpuWindow, format_ratio, load_average, speed_ratio


def test_agreeing_rounds_give_the_ratio_and_no_flag():
    figure = speed_ratio([2.0, 2.2, 1.8, 2.0], [1.0, 1.1, 0.9, 1.0], 0.5, 0.6, cpu_count=4)
    assert figure.ratio == pytest.approx(2.0)
    assert figure.low == pytest.approx(2.0) and figure.high == pytest.approx(2.0)
    assert figure.spread == pytest.approx(0.0)
    assert figure.flags == () and not figure.noisy
    assert figure.resolved
    assert format_ratio(figure) == "2.00x [2.00, 2.00]"


def test_interval_is_the_geometric_mean_of_paired_rounds():
    reference = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    method = [0.9, 0.8, 0.85, 0.95, 0.8, 0.9]
    figure = speed_ratio(reference, method, spread_threshold=10.0)
    expected = math.exp(sum(math.log(a / b) for a, b in zip(reference, method, strict=True)) / 6)
    assert figure.ratio == pytest.approx(expected)
    assert min(a / b for a, b in zip(reference, method, strict=True)) <= figure.low <= figure.ratio
    assert figure.ratio <= figure.high <= max(a / b for a, b in zip(reference, method, strict=True))
    assert figure.rounds == 6 and not figure.noisy


def test_disagreeing_rounds_fire_the_flag():
    # round 3 ran the method while something else took the CPU
    figure = speed_ratio([1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 1.5, 0.5])
    assert "rounds disagree" in figure.flags and figure.noisy
    assert figure.spread == pytest.approx((2.0 - 2 / 3) / 2.0)
    text = format_ratio(figure)
    assert "!" in text and "rounds disagree 67%" in text
    assert format_ratio(figure, detail=False).endswith(" !")
    # the same rounds under a looser threshold are not flagged
    assert not speed_ratio([1.0] * 4, [0.5, 0.5, 1.5, 0.5], spread_threshold=1.0).noisy


def test_load_change_and_busy_machine_fire_the_flag():
    rounds = ([1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
    changed = speed_ratio(*rounds, load_before=0.2, load_after=3.5, cpu_count=8)
    assert changed.flags == ("load changed",)
    assert "load 0.2->3.5" in format_ratio(changed)
    busy = speed_ratio(*rounds, load_before=6.0, load_after=6.2, cpu_count=2)
    assert busy.flags == ("busy",)
    quiet = speed_ratio(*rounds, load_before=0.5, load_after=0.9, cpu_count=2)
    assert quiet.flags == ()
    assert format_ratio(busy.as_dict()) == format_ratio(busy)  # a stored figure prints alike


def test_the_runs_own_threads_are_not_other_work():
    """Idle, a 2-thread run on 2 CPUs holds the load at about 2: not busy; a CPU burner
    beside it (one more core's worth) is."""
    rounds = ([1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
    idle = speed_ratio(*rounds, load_before=2.1, load_after=2.1, cpu_count=2, own_threads=2)
    assert idle.flags == ()
    burner = speed_ratio(*rounds, load_before=3.1, load_after=3.0, cpu_count=2, own_threads=2)
    assert burner.flags == ("busy",)
    # one thread of ours, another process on the second core
    shared = speed_ratio(*rounds, load_before=2.0, load_after=2.0, cpu_count=2, own_threads=1)
    assert shared.flags == ("busy",)
    # threads beyond the CPUs add no more load than the CPUs
    many = speed_ratio(*rounds, load_before=2.9, load_after=2.9, cpu_count=2, own_threads=8)
    assert many.flags == ("busy",)
    # without the thread count the old rule (load above the CPU count) stands
    assert speed_ratio(*rounds, load_before=2.1, load_after=2.1, cpu_count=2).flags == ("busy",)


def test_other_processes_cpu_use_decides_busy_when_it_was_read():
    rounds = ([1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
    # the load average says 2.8 (the run's own tokenizer threads), other processes used none
    own = speed_ratio(*rounds, 2.8, 2.8, cpu_count=2, own_threads=2, other_cores=0.05)
    assert own.flags == ()
    burner = speed_ratio(*rounds, 2.9, 3.0, cpu_count=2, own_threads=2, other_cores=0.97)
    assert burner.flags == ("busy",)
    assert format_ratio(burner).endswith("! other work 1.0 cores")
    assert format_ratio(burner.as_dict()) == format_ratio(burner)


def _spin(seconds):
    end = time.perf_counter() + seconds
    a = torch.randn(256, 256)
    while time.perf_counter() < end:
        a = (a @ a).tanh()


def test_cpu_window_counts_other_processes_not_this_one():
    """A CPU burner in another process shows as about one core; this process's own work,
    every thread of it, does not."""
    import subprocess
    import sys

    pytest.importorskip("psutil")
    quiet = CpuWindow()
    time.sleep(1.0)
    background = quiet.other_cores()
    assert background is not None and background >= 0
    if background > 0.3:
        pytest.skip(f"the machine is busy ({background:.1f} cores of other work): needs quiet")
    window = CpuWindow()
    _spin(1.0)
    assert window.other_cores() < background + 0.3
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        window = CpuWindow()
        time.sleep(1.5)
        other = window.other_cores()
    finally:
        burner.kill()
        burner.wait()
    assert other > background + 0.6


def test_idle_spread_is_not_flagged_but_a_disturbed_round_is():
    # five rounds as the idle default suite gave them: spread about 40 %
    idle = speed_ratio([1.0] * 5, [0.8, 0.7, 0.9, 0.85, 0.75])
    assert idle.spread == pytest.approx((1 / 0.7 - 1 / 0.9) / (1 / 0.8))
    assert "rounds disagree" not in idle.flags
    loaded = speed_ratio([1.0] * 5, [0.8, 0.7, 2.0, 0.85, 0.75])
    assert "rounds disagree" in loaded.flags


def test_one_round_has_a_point_interval():
    figure = speed_ratio([3.0], [1.5])
    assert (figure.ratio, figure.low, figure.high, figure.rounds) == (2.0, 2.0, 2.0, 1)
    assert format_ratio(figure) == "2.00x"


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (([1.0, 1.0], [1.0]), {}, "pair up"),
        (([], []), {}, "reference_seconds"),
        (([1.0, 0.0], [1.0, 1.0]), {}, "reference_seconds"),
        (([1.0, 1.0], [1.0, float("nan")]), {}, "method_seconds"),
        (([1.0], [1.0]), {"spread_threshold": 0}, "spread_threshold"),
        (([1.0], [1.0]), {"load_threshold": -1.0}, "load_threshold"),
        (([1.0], [1.0]), {"busy_threshold": 0.0}, "busy_threshold"),
        (([1.0], [1.0]), {"own_threads": 0}, "own_threads"),
    ],
)
def test_bad_input_is_named(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        speed_ratio(*args, **kwargs)


def test_interleaved_throughput_reads_the_load_before_and_after():
    result = interleaved_throughput(
        {"a": lambda: time.sleep(0.001), "b": lambda: time.sleep(0.001)},
        items_per_call=1,
        repeats=2,
    )
    load = result["load"]
    assert set(load) == {"before", "after", "threads", "other_cores"}
    assert load["threads"] == torch.get_num_threads()
    if load_average() is not None:
        assert load["before"] >= 0 and load["after"] >= 0


def _group(base_s, method_s, before, after, threads=None):
    return {
        "methods": {"base": {"seconds": base_s}, "m": {"seconds": method_s}},
        "load": {"before": before, "after": after, "threads": threads},
    }


def _group_speed(load, threads):
    return {"timing": {"groups": {"8": _group([1.0] * 4, [0.5] * 4, load, load, threads)}}}


def test_report_rows_carry_the_interval_and_the_flag():
    speed = {
        "timing": {"baseline": "base", "groups": {"8": _group([1.0] * 4, [0.5] * 4, 0.1, 0.1)}}
    }
    figure = _speed_figure(speed, "m", "base")
    assert figure is not None and figure["ratio"] == pytest.approx(2.0) and not figure["noisy"]
    noisy = {"timing": {"groups": {"8": _group([1.0] * 4, [0.5, 0.5, 2.0, 0.5], 0.1, 0.1)}}}
    flagged = _speed_figure(noisy, "m", "base")
    assert flagged is not None and flagged["noisy"]
    assert _speed_figure(speed, "m", "absent") is None
    # the stored thread count reaches the busy rule: 2 threads at load 2.1 on 2 CPUs is idle
    own = {"timing": {"groups": {"8": _group([1.0] * 4, [0.5] * 4, 2.1, 2.1, threads=2)}}}
    assert not _speed_figure(own, "m", "base", cpu_count=2)["noisy"]
    assert _speed_figure(_group_speed(2.1, None), "m", "base", cpu_count=2)["noisy"]
    row = Row(
        "model",
        "task",
        "turbo",
        "Turbo r=8",
        8,
        "acc",
        0.9,
        -0.01,
        1.0,
        1.5,
        10.0,
        2.0,
        "run",
        speed=flagged,
    )
    table = markdown_table([row])
    assert "! rounds disagree" in table
    assert "[" in table.split("| Turbo |")[1]


def test_bench_table_shows_intervals_and_load():
    from turbo_eval.commands.bench import bench_model, format_bench
    from turbo_eval.loaded_model import LoadedModel
    from turbo_eval.models import IMAGENET_MEAN, IMAGENET_STD, _hf_cls_features, _image_prepare

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
    )
    loaded = LoadedModel(
        "tiny-dinov2",
        Dinov2Model(config).eval(),
        "image",
        _image_prepare(56, IMAGENET_MEAN, IMAGENET_STD),
        _hf_cls_features,
    )
    figures = bench_model(
        "tiny-dinov2",
        r_values=(2,),
        batch=2,
        repeats=3,
        resolution=56,
        modes=("turbo", "redundancy"),
        loaded=loaded,
    )
    speed = figures["configs"]["turbo r=2"]["speed"]
    assert speed["rounds"] == 3 and speed["low"] <= speed["ratio"] <= speed["high"]
    assert set(figures["turbo_over_redundancy_speed"]) == {"r=2"}
    text = format_bench(figures)
    assert "interval over rounds" in text and "load average" in text
    assert format_ratio(speed) in text
