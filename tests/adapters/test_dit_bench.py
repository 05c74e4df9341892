"""Smoke and oracle tests of ``benchmarks/dit.py`` and ``benchmarks/dit_pareto.py`` on the
tiny widths (``--tiny``): the main paths cannot rot, and the full-depth projection of the
FLOPs equals what the full-depth (tiny) model counts. Timings of tiny models mean
nothing; only their shape is checked."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
dit = pytest.importorskip("dit")
dit_pareto = pytest.importorskip("dit_pareto")

import turbo_adapters  # noqa: E402
from turbo_eval.measure import count_flops  # noqa: E402


def _full_depth_flops_ratio(model: str, kwargs: dict) -> float:
    """The oracle: unpatched / patched FLOPs of the tiny model at the real depth."""
    x = dit.inputs(model, 64, tiny=True)
    torch.set_grad_enabled(False)
    try:
        full = dit.build(model, 64, dit.DEPTHS[model], tiny=True)
        plain = count_flops(lambda: full(**x))
        turbo_adapters.apply(full, use_rand=False, **kwargs)
        return plain / count_flops(lambda: full(**x))
    finally:
        torch.set_grad_enabled(True)


@pytest.mark.parametrize("model", ["sd3", "flux", "pixart"])
def test_rows_and_projected_flops_match_the_full_depth_model(model, tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--model", model, "--tiny", "--px", "64", "--blocks", "2", "--repeats", "1"]
    argv += ["--methods", "turbo", "todo", "--ratios", "0.5", "--json", str(out)]
    rows = dit.main(argv)
    assert json.loads(out.read_text()) == rows
    by_name = {r["setting"]: r for r in rows}
    assert list(by_name) == ["unpatched", "turbo 0.5", "todo x2"]
    plain = by_name["unpatched"]
    assert plain["rel_diff"] == 0.0 and plain["flops_ratio"] == 1.0
    assert plain["projected_flops_ratio"] == 1.0
    turbo = by_name["turbo 0.5"]
    assert turbo["flops_ratio"] > 1.0 and turbo["rel_diff"] > 0.0
    oracle = _full_depth_flops_ratio(model, {"ratio": 0.5})
    assert turbo["projected_flops_ratio"] == pytest.approx(oracle, rel=1e-9)
    for r in (plain, turbo):
        assert all(math.isfinite(t) and t > 0 for t in r["projected_seconds"])
    todo = by_name["todo x2"]  # joint attention too (SD3, FLUX)
    assert todo["flops_ratio"] > 1.0 and todo["rel_diff"] > 0.0
    assert todo["projected_flops_ratio"] == pytest.approx(
        _full_depth_flops_ratio(model, dit.METHODS["todo"][1](2)), rel=1e-9
    )
    assert "refused" not in capsys.readouterr().out


def test_project_scales_each_kind_and_keeps_the_rest_once():
    call = {"total": 10.0, "double": 3.0, "single": 4.0}  # rest 3
    assert dit.project(call, {"double": 1, "single": 2}, {"double": 19, "single": 38}) == (
        3.0 + 19 * 3.0 + 38 * 2.0
    )
    # a kind measured by no block takes the mean of the measured blocks
    call = {"total": 5.0, "joint": 0.0, "last": 2.0}
    assert dit.project(call, {"joint": 0, "last": 1}, {"joint": 23, "last": 1}) == 3.0 + 24 * 2
    with pytest.raises(ValueError, match="at least one block"):
        dit.project(call, {"joint": 0, "last": 0}, {"joint": 1})


def test_settings_sweep_and_bad_method():
    names = [s[0] for s in dit.settings_for(["turbo", "todo"], [0.5, 0.7], [2, 4])]
    assert names == ["unpatched", "turbo 0.5", "turbo 0.7", "todo x2", "todo x4"]
    with pytest.raises(ValueError, match="method 'tome' is not one of"):
        dit.settings_for(["tome"], [0.5], [2])


def test_pareto_front_against_brute_force():
    rows = [
        {"speedup": s, "rel_diff": d}
        for s, d in [(1.0, 0.0), (1.2, 0.01), (1.1, 0.02), (1.5, 0.05), (1.4, 0.06), (1.5, 0.04)]
    ]
    front = dit_pareto.pareto(rows)
    # oracle: a row is dominated when another is at least as fast and as close, one strictly
    expected = [
        r
        for r in rows
        if not any(
            o["speedup"] >= r["speedup"]
            and o["rel_diff"] <= r["rel_diff"]
            and (o["speedup"] > r["speedup"] or o["rel_diff"] < r["rel_diff"])
            for o in rows
        )
    ]
    assert front == sorted(expected, key=lambda r: r["speedup"])
    assert [(r["speedup"], r["rel_diff"]) for r in front] == [(1.0, 0.0), (1.2, 0.01), (1.5, 0.04)]


def test_pareto_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "rows.json"
    dit.main(["--model", "sd3", "--tiny", "--px", "64", "--repeats", "1", "--json", str(out)])
    for projected in ([], ["--projected"]):
        paths = dit_pareto.main([str(tmp_path / "fig"), str(out), *projected])
        assert len(paths) == 1 and paths[0].stat().st_size > 0
        assert paths[0].name == f"pareto_sd3_64px{'_projected' if projected else ''}.png"


def test_fidelity_sweep_ratio_zero_is_exact_and_todo_runs_on_joint_attention():
    dit_fidelity = pytest.importorskip("dit_fidelity")
    argv = ["--models", "sd3", "--steps", "1", "--px", "32", "--methods", "turbo", "todo"]
    rows = dit_fidelity.main([*argv, "--ratios", "0.0", "0.5"])
    by_name = {r["setting"]: r for r in rows}
    assert list(by_name) == ["turbo 0.0", "turbo 0.5", "todo x2"]
    assert by_name["turbo 0.0"]["rel_diff"] == 0.0  # ratio 0: the unpatched images
    assert by_name["turbo 0.5"]["rel_diff"] > 0.0
    assert by_name["turbo 0.5"]["psnr"] < math.inf
    assert by_name["todo x2"]["rel_diff"] > 0.0  # ToDo on SD3's joint attention
    assert "refused" not in by_name["todo x2"]
