"""Every VLM token-reduction method by name (``turbo_adapters.apply_vlm_method``): the names,
their stages and refusals, that each one really shortens what the language model sees, and
the table of which method runs at which stage on which family (``method_support``)."""

from __future__ import annotations

import copy

import pytest
import torch
from support import tiny_llava
from support.connector_cases import CASES
from transformers import LlavaForConditionalGeneration

import turbo_adapters
from turbo_adapters import VLM_METHODS, apply_vlm_method
from turbo_adapters.method_support import family_stages, method_support


def _shallow() -> LlavaForConditionalGeneration:  # the tiny LLaVA with 2 decoder layers
    config = tiny_llava.build().config
    config.text_config.num_hidden_layers = 2
    return LlavaForConditionalGeneration(config).eval()


def _last_layer_lengths(model: LlavaForConditionalGeneration) -> tuple[list[int], torch.Tensor]:
    """Sequence lengths entering the last decoder layer in one forward, and its logits."""
    seen: list[int] = []
    layer = model.model.language_model.layers[-1]
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    ids, mask = tiny_llava.left_pad(tiny_llava.rows([1]))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=tiny_llava.pixels(1))
    finally:
        handle.remove()
    return seen, logits.logits


def test_names_stages_and_refusals() -> None:
    model = tiny_llava.build()
    assert set(VLM_METHODS) == {
        "none", "turbo", "visionzip", "divprune", "cdpruner", "fastv", "pyramiddrop", "sparsevlm"
    }  # fmt: skip
    with pytest.raises(ValueError, match="method must be one of"):
        apply_vlm_method(model, "tome")
    with pytest.raises(ValueError, match="stage for method 'fastv' must be one of"):
        apply_vlm_method(model, "fastv", stage="connector")
    with pytest.raises(ValueError, match="budget must be"):
        apply_vlm_method(model, "divprune", budget=1.5)
    with pytest.raises(ValueError, match="needs at least 4 decoder layers"):
        apply_vlm_method(_shallow(), "pyramiddrop")
    assert apply_vlm_method(model, "none") is None
    assert turbo_adapters.handle_of(model) is None  # refusals left nothing behind


@pytest.mark.parametrize(
    ("method", "stage"), [(m, s) for m, stages in VLM_METHODS.items() for s in stages]
)
def test_each_method_shortens_the_prompt_and_remove_restores(method: str, stage: str) -> None:
    model = tiny_llava.build()
    plain_lengths, plain_logits = _last_layer_lengths(model)
    patch = apply_vlm_method(model, method, stage=stage, budget=0.5)
    assert patch is not None
    lengths, _ = _last_layer_lengths(model)
    # half the image's 64 tokens (or fewer, for staged methods) leave before the last layer
    assert lengths[0] <= plain_lengths[0] - tiny_llava.PER_IMAGE // 2
    patch.remove()
    again, logits = _last_layer_lengths(model)
    assert again == plain_lengths
    assert torch.equal(logits, plain_logits)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_declared_stages_are_what_the_patch_offers(case) -> None:
    """A family's ``stages`` (what ``turbo-eval methods`` lists) matches its patch."""
    model = case.build()
    patch = turbo_adapters.apply(model)
    try:
        adapter = turbo_adapters.get_adapter(patch.adapter_name)
        stages = adapter.stages
        if "tower" in adapter.stage_limits and patch.tower_refusal:
            stages = tuple(s for s in stages if s != "tower")  # a model the stage skips
        assert ("tower" in stages) == (not patch.tower_refusal), patch.tower_refusal
        assert ("connector" in stages) == patch.connector_available
        assert ("llm" in stages) == (patch.llm_refusal is None), patch.llm_refusal
    finally:
        patch.remove()


def test_method_support_meets_stages_and_refusals() -> None:
    rows = {(row.method, row.stage): row for row in method_support()}
    stages = family_stages()
    assert rows["cdpruner", "connector"].families == tuple(
        name for name, offered in stages.items() if "connector" in offered
    )
    assert "qwen-vl" in rows["fastv", "llm"].families
    assert "paligemma" not in rows["fastv", "llm"].families  # a prefix-LM decoder
    assert "hf-vit" in rows["tome", "tower"].families
    assert "llava" in rows["tome", "tower"].families
    assert "LLaVA-NeXT" in rows["tome", "tower"].limits["llava"]
    assert "internvl" in rows["tome", "tower"].families  # InternViT, restored before the shuffle
    assert "qwen-vl" in rows["tome", "tower"].families  # Qwen2/2.5-VL, whole 2x2 units
    assert "Qwen3-VL" in rows["tome", "tower"].limits["qwen-vl"]
    assert "qwen-vl" in rows["semantics", "tower"].refused
    todo = rows["todo", "denoiser"]
    assert not todo.refused and {"pixart", "sd3", "flux"} <= set(todo.families)
    assert all("sana" not in row.families for row in rows.values())  # refused outright
    # every method the VLM door names runs at a stage listed here
    for method, method_stages in VLM_METHODS.items():
        for stage in method_stages:
            assert (method, stage) in rows, (method, stage)


def _deeper(model, layers: int = 8):
    """The same tiny model class and config with ``layers`` decoder layers (seeded)."""
    config = copy.deepcopy(model.config)
    text = config.get_text_config()
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[0]] * layers
    torch.manual_seed(0)
    return type(model)(config).eval()


def _reduced_lengths(model, feed: dict) -> tuple[int, int]:
    """Tokens entering the language model's first decoder layer (what the connector cut)
    and tokens its last layer caches (what LLM mode cut), in one call."""
    from transformers import Cache

    seen: list[int] = []
    first = model.get_decoder().layers[0]

    def count(_module, args, kwargs) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    handle = first.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**feed, use_cache=True)
    finally:
        handle.remove()
    cache = next(v for v in out.values() if isinstance(v, Cache))
    return seen[0], int(cache.layers[-1].keys.shape[-2])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_listed_method_runs_on_the_family(case) -> None:
    """What ``method_support`` lists for a family runs there and shortens what it should."""
    model = case.build()
    if "llm" in turbo_adapters.adapter_for_model(model).stages:
        model = _deeper(model)  # the staged LLM methods need more than 3 layers
    feed = case.feed([0])
    plain = _reduced_lengths(model, feed)
    adapter = turbo_adapters.adapter_for_model(model)
    listed = [
        (row.method, row.stage)
        for row in method_support()
        if row.stage in ("connector", "llm") and adapter.name in row.families
    ]
    assert listed, adapter.name
    for method, stage in listed:
        patch = apply_vlm_method(model, method, stage=stage, budget=0.5)
        try:
            entering, cached = _reduced_lengths(model, feed)
        finally:
            patch.remove()
        if stage == "connector":
            assert entering < plain[0], (method, stage, entering, plain)
        else:  # the prompt enters whole; the last layer attends to fewer tokens
            assert entering == plain[0] and cached < plain[1], (method, stage, cached, plain)
