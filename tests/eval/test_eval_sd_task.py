"""The generation-fidelity task end to end on the tiny Stable Diffusion pipeline.

Oracles: the unpatched pipeline (the baseline cell's images are the reference: SSIM 1,
PSNR inf, MSE 0), tomesd 0.1.3 (redundancy-only Turbo with tomesd's windows computes
what tomesd computes), and PSNR/SSIM recomputed from the images by hand.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")
pytest.importorskip("tomesd")

from turbo_eval.models import LoadedModel, load_model
from turbo_eval.pipelines import PipelineModel
from turbo_eval.runner import run_suite
from turbo_eval.suite import find_suite, parse_suite
from turbo_eval.tasks import TASK_KINDS

SUITE = """\
[suite]
name = "sd-test"
batch_size = 2
methods = ["baseline", "redundancy", "turbo", "tomesd"]
alpha = [0.5]
semantic_scale = 1.0
throughput_batch = 1
throughput_repeats = 1

[[models]]
name = "sd-tiny"
r = [50]
merge = ["attn1", "ff"]
attn1_kv = false
use_rand = false
plan_from = "each"      # tomesd plans every sample on its own

[[tasks]]
kind = "generation-fidelity"
model = "sd-tiny"
prompts = ["a cat", "a red dog"]
seeds = 1
steps = 2
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny pipelines: thread start-up costs more than it saves (CI has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def results(tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("sd") / "results"
    run_suite(parse_suite(SUITE, "sd-test.toml"), out, progress=False, log=lambda _: None)
    return out


def read_cells(out: Path) -> dict[str, dict]:
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    return {cell["method"]: cell for cell in cells}


def test_suite_cells_per_image_and_reference(results):
    cells = read_cells(results)
    assert set(cells) == {"baseline", "redundancy", "turbo", "tomesd"}
    base = cells["baseline"]
    assert base["metrics"]["ssim"] == pytest.approx(1.0)
    assert base["metrics"]["latent_mse"] == 0.0 and base["metrics"]["psnr"] == math.inf
    for method in ("redundancy", "turbo", "tomesd"):
        cell = cells[method]
        items = cell["items"]
        assert cell["item_score"] == "ssim" and len(items["ssim"]) == 2  # one per prompt
        assert sum(items["ssim"]) / 2 == pytest.approx(cell["metrics"]["ssim"])
        assert all(0 < s < 1 for s in items["ssim"]) and min(items["latent_mse"]) > 0
        assert all(math.isfinite(p) for p in items["psnr"])
    # the semantic term changes which tokens merge
    assert cells["turbo"]["items"]["latent_mse"] != cells["redundancy"]["items"]["latent_mse"]


def test_redundancy_equals_tomesd_with_the_same_windows(results):
    """alpha 0, top-left destinations, queries merged: tomesd's computation (float32)."""
    cells = read_cells(results)
    ours, peer = cells["redundancy"]["items"], cells["tomesd"]["items"]
    for key in ("ssim", "latent_mse"):
        assert ours[key] == pytest.approx(peer[key], rel=1e-4, abs=1e-7)


def test_speed_flops_and_report(results):
    speed = json.loads(next((results / "speed").glob("*.json")).read_text())
    flops = speed["flops_per_item"]
    base = next(v for k, v in flops.items() if "__baseline__" in k)
    for key, value in flops.items():
        if "__baseline__" not in key:
            assert value < base  # merging attn1 and ff at 0.5 removes work
    from turbo_eval.commands.report import write_report

    write_report([results], results / "report")
    rows = json.loads((results / "report" / "table.json").read_text())
    assert {r["method"] for r in rows} == {"baseline", "redundancy", "turbo", "tomesd"}
    turbo = next(r for r in rows if r["method"] == "turbo")
    assert turbo["n_items"] == 2 and turbo["delta_low"] <= turbo["delta"] <= turbo["delta_high"]


def test_per_image_metrics_match_hand_computation():
    from turbo_eval.generation import psnr_per_image, ssim, ssim_per_image

    a = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    b = (a + 0.05 * torch.arange(3).view(3, 1, 1, 1)).clamp(0, 1)
    values = psnr_per_image(b, a)
    assert values[0] == math.inf
    mse = float((a[1] - b[1]).pow(2).mean())
    assert values[1] == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    per = ssim_per_image(b, a)
    assert per[0] == pytest.approx(1.0) and per[1] > per[2]
    assert ssim(b[1:2], a[1:2]) == pytest.approx(per[1])


def test_image_to_image_from_a_local_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    pixels = (torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(0)) * 255).byte()
    Image.fromarray(pixels.numpy()).save(folder / "one.png")
    model = load_model("sd-tiny", None, {"pipeline": "img2img", "attn1_kv": False})
    assert isinstance(model, PipelineModel) and model.image_to_image
    options = {"prompts": ["a cat", "a dog"], "steps": 3, "init_images": str(folder)}
    task = TASK_KINDS["generation-fidelity"](options, model, 0, 2)
    facts = task.prepare(lambda it, _: it)
    assert facts["kind"] == "image-to-image" and facts["size"] == [32, 32]
    assert all(item.image.shape == (3, 32, 32) for item in task.items)
    model.set_method({"r": 50, "mode": "turbo", "alpha": 0.1})
    merged = task.evaluate(lambda it, _: it)
    assert 0 < merged["ssim"] < 1
    model.set_method(None)
    assert not any(m._forward_hooks for m in model.module.unet.modules())
    assert task.evaluate(lambda it, _: it)["latent_mse"] == 0.0


def test_errors_name_the_parameter():
    model = load_model("sd-tiny", None, {})
    with pytest.raises(ValueError, match=r"percentage of tokens merged, an int in \[0, 100\)"):
        model.set_method({"r": 150, "mode": "turbo"})
    with pytest.raises(ValueError, match="model-side steps"):
        model.set_method({"r": 10, "model_side": "int8"})
    with pytest.raises(TypeError, match=r"cannot take the method setting\(s\) \['cross_modal'\]"):
        model.set_method({"r": 10, "mode": "turbo", "cross_modal": "turbo-cross"})
    with pytest.raises(TypeError, match=r"\['min_tokens'\]"):
        model.set_method({"r": 10, "peer": "tomesd", "min_tokens": 4})
    assert model.handle is None and model.peer is None  # refused before patching
    with pytest.raises(ValueError, match="unknown option"):
        load_model("sd-tiny", None, {"ratio_atn1": 0.5})
    with pytest.raises(ValueError, match="ratio_attn1 is set by r"):
        load_model("sd-tiny", None, {"ratio_attn1": 0.5})
    with pytest.raises(ValueError, match="merge must be"):
        load_model("sd-tiny", None, {"merge": ["attn3"]})
    task = TASK_KINDS["generation-fidelity"]({"init_images": "x", "steps": 1}, model, 0, 2)
    with pytest.raises(ValueError, match="needs an image-to-image pipeline"):
        task.prepare(lambda it, _: it)
    # tomesd is a method for pipelines only
    plain = LoadedModel("linear", torch.nn.Linear(2, 2), "image", list, lambda *a: None)
    with pytest.raises(ValueError, match="runs on diffusion pipelines only"):
        plain.set_method({"r": 4, "peer": "tomesd"})
    # ... and a pipeline needs a pipeline task model
    assert TASK_KINDS["generation-fidelity"].validate({"strength": 1.5, "seeds": 0}) == [
        ("seeds", "must be >= 1, got 0"),
        ("strength", "must be in (0, 1], got 1.5"),
    ]


def test_embedded_sd_suite_parses():
    suite = find_suite("sd")
    assert suite.name == "sd" and "tomesd" in suite.methods
    assert suite.tasks[0].kind == "generation-fidelity"
    default = parse_suite(
        textwrap.dedent("""\
        [[models]]
        name = "sd-tiny"
        [[tasks]]
        kind = "generation-fidelity"
        model = "sd-tiny"
        """)
    )
    assert "tomesd" not in default.methods  # the default methods stay Turbo's own
