"""turbo-eval methods stacked on model-side steps: int8, torch-pruning, UPop-style heads.

End to end on a tiny transformers ViT and real photos: the suite produces "Turbo +
int8", "Turbo + pruned 30%" and "Turbo + UPop-style" rows beside each step alone,
with fidelity against the dense unpatched model and FLOPs that multiply.
"""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("skimage")
pytest.importorskip("torch_pruning")
pytest.importorskip("torchao")

from turbo_eval.cli import main  # noqa: E402
from turbo_eval.methods import Cell, cells_for  # noqa: E402
from turbo_eval.model_side import build_side  # noqa: E402
from turbo_eval.suite import SuiteError, parse_suite  # noqa: E402

METHODS = ["baseline", "turbo", "int8", "turbo+int8", "prune", "turbo+prune", "upop", "turbo+upop"]


def suite_text(model: str, methods: list[str], extra: str = "") -> str:
    return textwrap.dedent(f"""\
        [suite]
        name = "stack"
        batch_size = 4
        methods = {json.dumps(methods)}
        alpha = [5.0]
        throughput_batch = 4
        throughput_repeats = 1

        [[models]]
        name = "{model}"
        resolution = 32
        r = [3]
        {extra}

        [[tasks]]
        kind = "fidelity"
        model = "{model}"
        max_images = 4
    """)


def test_methods_parse_and_make_cells_with_paper_labels() -> None:
    suite = parse_suite(suite_text("m", METHODS))
    cells = cells_for(suite, "m", "fidelity")
    assert [(c.method, c.r) for c in cells] == [
        ("baseline", 0), ("int8", 0), ("prune", 0), ("upop", 0),
        ("turbo", 3), ("turbo+int8", 3), ("turbo+prune", 3), ("turbo+upop", 3),
    ]  # fmt: skip
    labels = {c.method: c.label for c in cells}
    assert labels["turbo+upop"] == "Turbo + UPop-style α=5 r=3"  # noqa: RUF001
    assert labels["upop"] == "UPop-style" and labels["int8"] == "int8"
    assert Cell("m", "fidelity", "int8", 0).overrides(suite) == {"model_side": "int8"}
    stacked = Cell("m", "fidelity", "redundancy+prune", 3).overrides(suite)
    assert stacked == {"r": 3, "mode": "redundancy", "alpha": 0.0, "model_side": "prune"}


@pytest.mark.parametrize("bad", ["baseline+int8", "turbo+awq", "int4", "turbo+"])
def test_unknown_stacks_are_rejected_with_the_allowed_forms(bad: str) -> None:
    with pytest.raises(SuiteError, match=r"METHOD\+SIDE, or a SIDE alone"):
        parse_suite(suite_text("m", ["baseline", bad]))


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=80, num_hidden_layers=3, num_attention_heads=10, intermediate_size=160,
        image_size=32, patch_size=4,
    )  # fmt: skip
    model = transformers.ViTModel(config).eval()
    with torch.no_grad():  # sharper attention than the default init
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.mul_(4.0)
    path = tmp_path_factory.mktemp("models") / "tiny-vit"
    model.save_pretrained(path)
    return path


def test_suite_rows_for_turbo_stacked_on_each_step(tiny_vit: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite.toml"
    suite.write_text(suite_text(str(tiny_vit), METHODS, "upop_keep = [1.0, 0.5, 0.5]"))
    out = tmp_path / "results"
    assert main(["run", str(suite), "--out", str(out), "--no-progress"]) == 0
    rows = {r["method"]: r for r in json.loads((out / "table.json").read_text())}
    assert set(rows) == set(METHODS)
    fidelity = {m: r["value"] for m, r in rows.items()}
    assert fidelity["baseline"] == pytest.approx(1.0, abs=1e-5)
    assert 0.9 < fidelity["int8"] < 1.0  # int8 is close to, not equal to, the dense model
    assert all(0.0 < v <= 1.0 + 1e-6 for v in fidelity.values())
    flops = {m: r["flops_ratio"] for m, r in rows.items()}
    for side in ("prune", "upop"):
        assert flops[side] > 1.05
        # Turbo's saving multiplies with the step's (the token counts are the same)
        assert flops[f"turbo+{side}"] == pytest.approx(flops["turbo"] * flops[side], rel=0.08)
    assert flops["int8"] == pytest.approx(1.0) and flops["turbo+int8"] == pytest.approx(
        flops["turbo"]
    )
    cells = {
        json.loads(p.read_text())["method"]: json.loads(p.read_text())
        for p in (out / "cells").glob("*.json")
    }
    assert cells["turbo+upop"]["token_counts"] == cells["turbo"]["token_counts"] == [62, 59, 56]
    assert cells["upop"]["token_counts"] is None


# ------------------------------------------------------------------------- GPTQ
def test_gptq_methods_parse_and_need_a_quantized_model() -> None:
    methods = ["baseline", "turbo", "gptq", "turbo+gptq"]
    suite = parse_suite(suite_text("m", methods, 'gptq_model = "lm-gptq"'))
    labels = {c.method: c.label for c in cells_for(suite, "m", "fidelity")}
    assert labels["gptq"] == "GPTQ" and labels["turbo+gptq"] == "Turbo + GPTQ α=5 r=3"  # noqa: RUF001
    assert Cell("m", "fidelity", "turbo+gptq", 3).overrides(suite)["model_side"] == "gptq"
    with pytest.raises(SuiteError, match="gptq_model: required by the gptq methods"):
        parse_suite(suite_text("m", methods))


def test_gptq_side_names_what_is_missing(tmp_path: Path) -> None:
    """Without ``gptq_model``, or without gptqmodel (this environment), the side says
    what to give or install (the side itself is tested in the gptq environment)."""
    import torch

    dense = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="the gptq side needs gptq_model = a folder"):
        build_side(dense, "gptq", {}, None)
    if importlib.util.find_spec("gptqmodel") is None:
        with pytest.raises(ModuleNotFoundError, match=r"gptqmodel.*tox -e gptq"):
            build_side(dense, "gptq", {"gptq_model": str(tmp_path)}, None)
