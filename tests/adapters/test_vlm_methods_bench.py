"""Smoke test of ``benchmarks/vlm_methods.py``: its main path on tiny configs, so the
script cannot rot. Its figures on tiny models mean nothing; only their shape is checked."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
vlm_methods = pytest.importorskip("vlm_methods")

FIGURES = ("ttft", "speedup", "proj_ttft", "proj_speedup", "kl", "first_agree", "answer_agree")


def _run(model: str, *extra: str) -> tuple[dict, list[dict]]:
    argv = ["--tiny", "--model", model, "--rounds", "1", "--prompts", "1", "--new-tokens", "2"]
    result = vlm_methods.main([*argv, "--budgets", "128", *extra])
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


def test_qwen_marks_refusals_and_runs_the_others():
    _, lines = _run("qwen2_5_vl", "--no-static")
    assert [line["method"] for line in lines] == list(vlm_methods.METHODS)
    refused = {line["method"]: line["refused"] for line in lines if "refused" in line}
    # no merging in Qwen's windowed tower; VisionZip runs on the mean-query guide
    assert set(refused) == {"turbo-tower"}
    assert "tower mode is not available" in refused["turbo-tower"]
    for line in lines:
        if "refused" in line:
            continue
        for field in FIGURES:
            assert math.isfinite(line[field]), (line["key"], field)


def test_bad_arguments_name_the_option():
    with pytest.raises(SystemExit):
        vlm_methods.parse(["--rounds", "0"])
