"""Smoke test of ``benchmarks/vlm_methods.py``: its main path on tiny configs, so the
script cannot rot. Its figures on tiny models mean nothing; only their shape is checked."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
vlm_methods = pytest.importorskip("vlm_methods")

FIGURES = ("ttft", "speedup", "proj_ttft", "proj_speedup", "kl", "first_agree", "answer_agree")


def _run(model: str, *extra: str, budget: str = "128") -> tuple[dict, list[dict]]:
    argv = ["--tiny", "--model", model, "--rounds", "1", "--prompts", "1", "--new-tokens", "2"]
    result = vlm_methods.main([*argv, "--budgets", budget, *extra])
    return result, vlm_methods.summarise(result)


def test_llava_table_has_every_method_with_finite_figures(capsys):
    result, lines = _run("llava")
    assert [line["method"] for line in lines] == list(vlm_methods.METHODS)
    budget = 128 * result["n_image"] // 576
    for line in lines:
        for field in (*FIGURES, "gflops", "peak_mib"):
            assert math.isfinite(line[field]), (line["key"], field)
        if line["method"] in vlm_methods.CONNECTOR:
            assert line["kept"] == budget, line  # the connector keeps exactly the budget
            assert line["method_share"] > 0
        if line["method"] != "unpatched":
            assert line["flops_ratio"] > 1.0, line  # fewer tokens: fewer FLOPs
    unpatched = lines[0]
    assert unpatched["kl"] == 0.0 and unpatched["answer_agree"] == 1.0
    table = capsys.readouterr().out
    assert "measured under load from parallel work" in table
    assert "PROJECTED to 32 layers" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(vlm_methods.METHODS)  # the header, then one row per method


def test_qwen_runs_every_method_including_its_tower_stage():
    # 512 of 1024 scaled to the tiny image: 8 of its 16 units, its tower has 4 windows
    result, lines = _run("qwen2_5_vl", "--no-static", budget="512")
    assert [line["method"] for line in lines] == list(vlm_methods.METHODS)
    assert not [line for line in lines if "refused" in line]  # VisionZip: mean-query guide
    for line in lines:
        for field in FIGURES:
            assert math.isfinite(line[field]), (line["key"], field)
    tower = next(line for line in lines if line["method"] == "turbo-tower")
    assert tower["tower_s"] > 0  # the tower's hooks saw the reducing tower run
    assert result["rows"]["turbo-tower@8"]["lengths"][0] < result["rows"]["unpatched"]["lengths"][0]


def test_qwen_tower_below_the_window_count_is_a_refused_row():
    _, lines = _run("qwen2_5_vl", "--no-static", "--methods", "turbo-tower")
    refused = {line["method"]: line["refused"] for line in lines if "refused" in line}
    assert "attention windows" in refused["turbo-tower"]  # 2 tokens kept, 4 windows


def test_subset_takes_fidelity_from_the_rounds_and_prints_the_bound(capsys, tmp_path):
    argv = ["--tiny", "--model", "llava", "--rounds", "2", "--prompts", "0", "--no-static"]
    saved = str(tmp_path / "out.json")
    result = vlm_methods.main(
        [*argv, "--budgets", "128", "--methods", "fastv", "turbo", "--json", saved]
    )
    lines = vlm_methods.summarise(result)
    assert [line["method"] for line in lines] == ["unpatched", "fastv", "turbo"]  # as given
    for line in lines:
        for field in (*FIGURES, "tower_s"):
            assert math.isfinite(line[field]), (line["key"], field)
        assert line["tower_s"] > 0  # the tower's hooks saw it run
        assert line["first_agree"] == line["answer_agree"]  # one token: the same figure
    assert lines[0]["kl"] == 0.0 and lines[1]["kl"] > 0.0  # the connector changed the logits
    assert all(len(row["ttft"]) == 2 for row in result["rows"].values())
    out = capsys.readouterr().out
    assert "fidelity of the first token of the timing prompt" in out
    assert "Amdahl bound (tower unreduced; PROJECTED to 32 layers from medians" in out
    assert f"- {128 * result['n_image'] // 576} image tokens kept" in out
    vlm_methods.main(["--render", saved])  # the saved run's table, nothing measured again
    rendered = capsys.readouterr().out
    assert rendered.strip() == vlm_methods.table(result).strip()
    assert rendered.strip() in out  # the table the run printed


def test_bound_arithmetic_on_hand_made_figures():
    """Unpatched: 10 s = tower 4 + rest 2 + 4 layers of 1 s (592 tokens, 576 of the image),
    so 38 s projected to 32 layers; the connector row's layers take 0.25 s at 80 tokens."""
    row = {"method": "turbo", "budget": 64, "layer_s": [[0.25] * 4], "lengths": [80] * 4}
    base = {"method": "unpatched", "budget": 0, "ttft": [10.0], "tower_s": [4.0],
            "projected": [38.0], "layer_s": [[1.0] * 4], "lengths": [592] * 4}  # fmt: skip
    result = {"rows": {"unpatched": base, "turbo@64": row}, "depth": 32, "n_image": 576,
              "args": {"model": "llava"}}  # fmt: skip
    head, line = vlm_methods.bounds(result)
    assert "tower 4.00 s (11%, 1 calls) + rest 2.00 s + 32 LLM layers 32.00 s" in head
    assert head.endswith("ceiling with the LLM free: 6.33x")  # 38 / (4 + 2)
    assert "bound 2.71x" in line  # 38 / (6 + 32 * 0.25)
    # 3x: 38 / 3 - 6 = 32 * t, t = 0.2083 s per layer; linear in length between 80 and
    # 592 tokens: 51.6 tokens, 16 of them text -> 36 image tokens (6.2 %)
    assert line.endswith("3x needs <= 36 image tokens (6.2%)")
    # the tower: the median over every call that runs it whole (4, 6, 6 s): 40 s / 8 s
    row["tower_s"] = [6.0, 6.0]
    assert vlm_methods.bounds(result)[0].endswith("ceiling with the LLM free: 5.00x")
    row["tower_s"] = []
    row["layer_s"] = [[0.9] * 4]  # a layer at 64 tokens is nearly the full one: 3x is out
    assert vlm_methods.bounds(result)[1].endswith("3x is out of reach even with no image tokens")


def test_bad_arguments_name_the_option():
    with pytest.raises(SystemExit):
        vlm_methods.parse(["--rounds", "0"])


def _static(model: str, *extra: str) -> dict:
    argv = ["--tiny", "--model", model, "--static-only", "--prompts", "0", "--budgets", "128"]
    return vlm_methods.main([*argv, *extra])


@pytest.mark.parametrize("model", ["qwen2_5_vl", "llava"])
def test_split_static_pass_equals_the_whole_call(model, capsys):
    """The tower counted once plus each row's call after it: exactly the whole call's FLOPs
    and peak bytes, for the unpatched model, every connector method and every LLM mode."""
    split = _static(model)
    whole = _static(model, "--static-whole")
    assert split["static"]["split"] and not whole["static"]["split"]
    tower = split["static"]["tower_gflops"]
    assert 0 < tower < whole["rows"]["unpatched"]["gflops"]
    assert split["static"]["tower_peak_mib"] > 0
    kinds = {}
    for key, row in whole["rows"].items():
        if row.get("refused"):
            assert split["rows"][key]["refused"] == row["refused"]
            continue
        kinds[row["method"]] = split["rows"][key]["static"]
        assert split["rows"][key]["gflops"] == row["gflops"], key
        assert split["rows"][key]["peak_mib"] == row["peak_mib"], key
    assert kinds["unpatched"] == kinds["fastv"] == kinds["sparsevlm"] == "split"
    if model == "qwen2_5_vl":  # no Qwen method acts in the tower (tower mode is refused)
        assert set(kinds.values()) == {"split"}
    else:  # LLaVA's connector methods take their guide from a hook in the tower
        assert kinds["visionzip"] == kinds["turbo-tower"] == "whole"
    out = capsys.readouterr().out
    assert "activations, KV cache and logits; not the weights" in out
    assert "Both counted split: the vision tower once" in out
    assert "0 rounds, static pass only (FLOPs and memory; no timing, no fidelity)" in out


def test_replayed_tower_refuses_other_inputs():
    peak = vlm_methods.llava_ttft.prefill_peak_bytes
    subject = vlm_methods.Subject(vlm_methods.parse(["--tiny", "--model", "qwen2_5_vl"]))
    split = vlm_methods.TowerSplit(subject.tower)
    kwargs = subject.configure("unpatched", 0)[0]
    own = subject.tower.__dict__.get("forward")  # Turbo's tower-stage wrapper, if installed
    with pytest.raises(RuntimeError, match="needs a capture"), split.replay():
        pass
    other = vlm_methods.connector_ttft.qwen_inputs(1, 112, seed=7)
    with torch.inference_mode():
        split.capture(lambda: subject.generate(subject.feeds[0], kwargs, 1))
        with pytest.raises(RuntimeError, match="other inputs than captured"), split.replay():
            subject.generate(other, kwargs, 1)
        with split.replay():  # the captured inputs: the tower's output, no tower FLOPs
            rest = vlm_methods.count_flops(lambda: subject.generate(subject.feeds[0], kwargs, 1))
        whole = vlm_methods.count_flops(lambda: subject.generate(subject.feeds[0], kwargs, 1))
    assert 0 < split.flops < whole and rest + split.flops == whole
    # the replay's live-bytes curve: the tower's peak, then the tower's output left live
    pixels, grid = subject.feeds[0]["pixel_values"], subject.feeds[0]["image_grid_thw"]
    outputs = []
    with torch.inference_mode():
        alone = peak(lambda: outputs.append(subject.tower(pixels, grid_thw=grid)))
        with split.replay():
            replayed = peak(lambda: outputs.append(subject.tower(pixels, grid_thw=grid)))
    assert alone == split.peak == replayed
    held = [sorted(t.untyped_storage().nbytes() for t in out.values()) for out in outputs]
    assert held[0] == held[1] and sum(held[0]) > 0
    assert subject.tower.__dict__.get("forward") is own  # the forward it had is back
    subject.timer.close()


def test_tower_at_median_replaces_only_whole_towers():
    """Hand-made rounds: the whole tower took 10 or 30 s (load), the tower stage 4 s; the
    column puts the median of the whole towers (20 s) in every whole-tower call."""
    row = lambda method, projected, tower: {
        "method": method, "budget": 8, "projected": projected, "tower_s": tower,
    }  # fmt: skip
    result = {
        "rows": {
            "unpatched": row("unpatched", [110.0, 130.0], [10.0, 30.0]),
            "turbo@8": row("turbo", [40.0, 60.0], [10.0, 30.0]),
            "turbo-tower@8": row("turbo-tower", [34.0, 34.0], [4.0, 4.0]),
        }
    }
    assert vlm_methods.whole_tower_median(result) == 20.0
    base, connector, tower = result["rows"].values()
    # unpatched without its tower is 100 s in both rounds; the connector row 30 s
    assert vlm_methods._steady_ratios(base, connector, 2, 20.0) == [120 / 50, 120 / 50]
    assert vlm_methods._steady_ratios(base, tower, 2, 20.0) == [120 / 34, 120 / 34]
    assert vlm_methods._steady_ratios(base, connector, 2, None) == []
