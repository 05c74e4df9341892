"""hf-blip2 / hf-instructblip: the vision tower through the attention registry, tiny models.

Oracles: the unpatched model (logits, ITM/ITC scores, greedy and beam ids with OPT and
T5 language models, after ``remove``), per-row calls, and the conformance kit's.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from support.tiny_blip import prune_mlp  # noqa: E402
from support.tiny_blip2 import (  # noqa: E402
    HEADS,
    IMAGE_TOKEN,
    OPT,
    QUERIES,
    T5,
    TOKENS,
    build,
    images,
)

import turbo_adapters as ta  # noqa: E402
from turbo_adapters.families import blip2  # noqa: E402
from turbo_adapters.testing import Case, parametrize, run_check  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompt(batch: int) -> torch.Tensor:
    """Image placeholders followed by a few text tokens (what the processor makes)."""
    text = torch.randint(3, 60, (batch, 5), generator=torch.Generator().manual_seed(batch))
    return torch.cat([torch.full((batch, QUERIES), IMAGE_TOKEN), text], dim=1)


def qformer_text(batch: int) -> torch.Tensor:
    return torch.randint(3, 60, (batch, 6), generator=torch.Generator().manual_seed(batch + 7))


def qk(model: nn.Module, block: nn.Module, x: torch.Tensor):
    attn = block.self_attn
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).view(batch, tokens, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], attn.scale


def layers(name: str) -> Any:
    return lambda model: [m for m in model.modules() if type(m).__name__ == name]


def lm_logits(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    return model(pixel_values=args[0], input_ids=args[1]).logits


def retrieval_scores(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    pixels, ids = args  # ids: image placeholders, then text (the model slices them off)
    mask = torch.ones_like(ids)
    itm = model(pixel_values=pixels, input_ids=ids, use_image_text_matching_head=True)
    itc = model(
        pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False
    )
    return torch.cat([itm.logits_per_image, itc.logits_per_image.diagonal().unsqueeze(-1)], -1)


def instruct_logits(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    pixels, ids, instruction = args
    return model(pixel_values=pixels, input_ids=ids, qformer_input_ids=instruction).logits


CASES = [
    Case(
        "hf-blip2-vision",
        lambda: build("Blip2VisionModel"),
        lambda b: (images(b),),
        lambda m, a: m(*a).last_hidden_state[:, 0],
        TOKENS,
        1,
        layers("Blip2EncoderLayer"),
        blip2.BLIP2_LAYER,
        qk,
        prune=prune_mlp,
    ),
    Case(
        "hf-blip2-opt",
        lambda: build("Blip2ForConditionalGeneration"),
        lambda b: (images(b), prompt(b)),
        lm_logits,
        TOKENS,
        1,
        layers("Blip2EncoderLayer"),
        blip2.BLIP2_LAYER,
        qk,
        cannot={"torch_pruning": "covered by hf-blip2-vision (tracing the LM is not the point)"},
    ),
    Case(
        "hf-instructblip",
        lambda: build("InstructBlipForConditionalGeneration"),
        lambda b: (images(b), prompt(b), qformer_text(b)),
        instruct_logits,
        TOKENS,
        1,
        layers("InstructBlipEncoderLayer"),
        blip2.BLIP2_LAYER,
        qk,
        cannot={"torch_pruning": "covered by hf-blip2-vision (tracing the LM is not the point)"},
    ),
]


@parametrize(CASES)
def test_conformance(case: Case, check: str) -> None:
    if case.id != "hf-blip2-vision" and check in ("compile", "threads", "roles_survive_settings"):
        pytest.skip("tower-level behaviour, run once on hf-blip2-vision (CI budget)")
    run_check(case, check)


@torch.no_grad()
@pytest.mark.parametrize("language_model", ["opt", "t5"])
def test_generate_r0_equals_unpatched_and_r_reduces_once(language_model: str) -> None:
    model = build("Blip2ForConditionalGeneration", OPT if language_model == "opt" else T5)
    pixels = images(4)
    greedy = model.generate(pixel_values=pixels, max_new_tokens=5)
    beams = model.generate(pixel_values=pixels, max_new_tokens=5, num_beams=2)
    patch = ta.apply(model, r=0)
    assert torch.equal(model.generate(pixel_values=pixels, max_new_tokens=5), greedy)
    assert torch.equal(model.generate(pixel_values=pixels, max_new_tokens=5, num_beams=2), beams)
    patch.r = 3
    calls = [0]
    model.vision_model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    reduced = model.generate(pixel_values=pixels, max_new_tokens=5, min_new_tokens=5)
    assert calls == [1] and patch.last_state.token_counts == [14, 11, 8, 5]
    for b in (0, 3):  # batch 1 equals its row in batch 4
        alone = model.generate(pixel_values=pixels[b : b + 1], max_new_tokens=5, min_new_tokens=5)
        assert torch.equal(alone[0], reduced[b])
    beam = model.generate(pixel_values=pixels, max_new_tokens=5, min_new_tokens=5, num_beams=3)
    assert calls == [4] and beam.shape[0] == 4
    ta.remove(model)
    assert torch.equal(model.generate(pixel_values=pixels, max_new_tokens=5), greedy)


@torch.no_grad()
def test_retrieval_and_model_classes() -> None:
    pixels, ids = images(3), prompt(3)
    retrieval = build("Blip2ForImageTextRetrieval")
    reference = retrieval_scores(retrieval, (pixels, ids))
    patch = ta.apply(retrieval, r=0)
    torch.testing.assert_close(retrieval_scores(retrieval, (pixels, ids)), reference)
    patch.r = 3
    scores = retrieval_scores(retrieval, (pixels, ids))
    assert scores.shape == reference.shape and torch.isfinite(scores).all()
    assert patch.last_state.token_counts == [14, 11, 8, 5]

    model = build("Blip2Model")

    def queries() -> torch.Tensor:
        out = model.get_qformer_features(pixel_values=pixels)
        return getattr(out, "last_hidden_state", out)

    reference = queries()
    patch = ta.apply(model, r=0)
    torch.testing.assert_close(queries(), reference)
    patch.r = 3
    assert queries().shape == reference.shape  # always num_query_tokens, whatever the image length


@torch.no_grad()
def test_instructblip_generate() -> None:
    model = build("InstructBlipForConditionalGeneration")
    pixels, ids = images(2), qformer_text(2)
    reference = model.generate(pixel_values=pixels, qformer_input_ids=ids, max_new_tokens=4)
    patch = ta.apply(model, r=0)
    assert torch.equal(
        model.generate(pixel_values=pixels, qformer_input_ids=ids, max_new_tokens=4), reference
    )
    patch.r = 3
    out = model.generate(pixel_values=pixels, qformer_input_ids=ids, max_new_tokens=4, num_beams=2)
    assert out.shape[0] == 2 and patch.last_state.token_counts[-1] == 5


def test_only_the_vision_config_selects_turbo() -> None:
    model = build("Blip2ForConditionalGeneration")
    before = {
        "qformer": model.qformer.config._attn_implementation,
        "lm": model.language_model.config._attn_implementation,
    }
    vision = model.vision_model.config
    before["vision"] = vision._attn_implementation
    ta.apply(model, r=2)
    attentions = [layer.self_attn for layer in model.vision_model.encoder.layers]
    # the tower's attention modules select turbo on the patch's own copy of their config;
    # the shared configs (the tower's, the Q-Former's, the LM's) are untouched
    assert all(a.config._attn_implementation == "turbo" for a in attentions)
    assert all(a.config is not vision for a in attentions)
    assert model.vision_model.config._attn_implementation == before["vision"]
    assert model.qformer.config._attn_implementation == before["qformer"]
    assert model.language_model.config._attn_implementation == before["lm"]
    ta.remove(model)
    assert all(a.config is vision for a in attentions)


@pytest.mark.parametrize(
    ("name", "adapter"),
    [
        ("Salesforce/blip2-opt-2.7b", "hf-blip2"),
        ("Salesforce/blip2-flan-t5-xl", "hf-blip2"),
        ("Salesforce/blip2-itm-vit-g", "hf-blip2"),
        ("blip-2", "hf-blip2"),
        ("Salesforce/instructblip-vicuna-7b", "hf-instructblip"),
        ("instructblip", "hf-instructblip"),
    ],
)
def test_registry_names(name: str, adapter: str) -> None:
    assert ta.get_adapter(name).name == adapter


@torch.no_grad()
def test_from_pretrained_on_a_local_checkpoint(tmp_path) -> None:
    build("Blip2ForConditionalGeneration").save_pretrained(tmp_path)
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert ta.adapter_for_model(model).name == "hf-blip2"
    pixels = images(2)
    reference = model.generate(pixel_values=pixels, max_new_tokens=4)
    patch = ta.apply(model, r=0)
    assert torch.equal(model.generate(pixel_values=pixels, max_new_tokens=4), reference)
    patch.r = 2
    model.generate(pixel_values=pixels, max_new_tokens=4)
    assert patch.last_state.token_counts == [15, 13, 11, 9]
