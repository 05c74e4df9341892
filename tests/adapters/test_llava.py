"""LLaVA-1.5 (transformers 5) with Turbo: tower mode and LLM mode.

Oracles: the unpatched model (r = 0 / keep = 1 token for token; after ``remove``);
the unpatched model fed hand-built shortened prompts with the merged tower features
(tower mode); the unpatched language model run on the kept embeddings at their
original positions, with the ranking recomputed in support/fastv_oracle.py (LLM mode at K = 0); each row
generated alone (batches with padding and different image counts).
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("transformers")
import transformers
from support.fastv_oracle import greedy_on_kept, ranked_kept
from support.tiny_llava import IMG, PER_IMAGE, build, left_pad, pixels, rows
from transformers import LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import turbo_adapters as ta
from turbo_adapters.compat import IncompatibleLibraryError, versions_tested
from turbo_adapters.families.llava import LlavaPatch
from turbo_adapters.families.llava.llm import LLMReduction, cache_state, find_cache

NEW = 6


@pytest.fixture(scope="module")
def model() -> LlavaForConditionalGeneration:
    return build()


def generate(model, ids, mask, px, **kw) -> torch.Tensor:
    if px is not None:
        kw["pixel_values"] = px
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
            do_sample=False, **kw,
        )  # fmt: skip


BATCH = [2, 1, 0]  # images per row: different counts, one row text-only


# ------------------------------------------------------------------- r = 0
def test_registry_and_class_matching(model) -> None:
    assert ta.get_adapter("llava-hf/llava-1.5-7b-hf").name == "llava"
    assert ta.get_adapter("llava-hf/llava-v1.6-mistral-7b-hf").name == "llava"
    assert ta.get_adapter("llava_next").name == "llava"
    assert ta.adapter_for_model(model).name == "llava"


@pytest.mark.parametrize("mode", ["tower", "llm", "both"])
def test_r0_equals_unpatched_greedy(model, mode: str) -> None:
    ids, mask = left_pad(rows(BATCH))
    px = pixels(sum(BATCH))
    reference = generate(model, ids, mask, px)
    patch = ta.apply(model, r=0)
    try:
        patch.llm = LLMReduction(layer=1, keep=1.0)
        out = generate(model, ids, mask, px, turbo_mode=mode)
    finally:
        patch.remove()
    assert torch.equal(out, reference)
    assert len(set(reference[:, -NEW:].flatten().tolist())) > 2  # the model is not degenerate


# -------------------------------------------------------------- tower mode
def test_tower_generate_matches_unpatched_on_hand_shortened_prompts(model) -> None:
    prompts = rows(BATCH)
    ids, mask = left_pad(prompts)
    px = pixels(sum(BATCH))
    patch = ta.apply(model, r=5)
    try:
        out = generate(model, ids, mask, px)
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=px, return_dict=True)
    finally:
        patch.remove()
    merged = features.pooler_output[0].shape[0]
    assert merged == PER_IMAGE + 1 - 5 * 3 - 1  # 3 layers reach the feature layer (-2)
    # the callers' prompt comes back in front of the new tokens
    assert out.shape == (3, ids.shape[1] + NEW)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    short_ids, short_mask = left_pad(rows(BATCH, per_image=merged))
    with torch.no_grad():
        expected = model.generate(
            input_ids=short_ids, attention_mask=short_mask, mm_encoder_outputs={"image": features},
            max_new_tokens=NEW, do_sample=False,
        )  # fmt: skip
    assert torch.equal(out[:, -NEW:], expected[:, -NEW:])


@pytest.mark.parametrize("batch", [[1], [2, 1, 0]])
def test_tower_generate_batch_rows_equal_single_rows(model, batch: list[int]) -> None:
    prompts = rows(batch)
    ids, mask = left_pad(prompts)
    px = pixels(sum(batch))
    patch = ta.apply(model, r=4)
    try:
        out = generate(model, ids, mask, px)
        start = 0
        for b, p in enumerate(prompts):
            one = torch.tensor([p])
            sub = px[start : start + batch[b]] if batch[b] else None
            start += batch[b]
            alone = generate(model, one, torch.ones_like(one), sub)
            assert torch.equal(out[b, -NEW:], alone[0, -NEW:])
            assert torch.equal(alone[0, : len(p)], one[0])
    finally:
        patch.remove()


def test_tower_forward_shortens_ids_labels_and_reports_merge(model) -> None:
    ids, mask = left_pad(rows([1, 2]))
    px = pixels(3)
    labels = torch.where(ids == IMG, -100, ids)
    patch = ta.apply(model, r=6)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels)
        counts = patch.last_state.token_counts
    finally:
        patch.remove()
    assert counts == [65 - 6, 65 - 12, 65 - 18]
    merged = counts[-1] - 1
    assert out.logits.shape[1] == ids.shape[1] - 2 * (PER_IMAGE - merged)  # longest row: 2 images
    assert torch.isfinite(out.loss)


def test_tower_mode_off_per_call_is_unpatched(model) -> None:
    ids, mask = left_pad(rows([1]))
    px = pixels(1)
    reference = generate(model, ids, mask, px)
    with ta.patched(model, r=8):
        assert torch.equal(generate(model, ids, mask, px, turbo_mode="none"), reference)


# ---------------------------------------------------------------- LLM mode
def test_llm_prune_at_layer0_matches_unpatched_on_kept_tokens(model) -> None:
    prompt = rows([1])[0]
    ids = torch.tensor([prompt])
    px = pixels(1)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(pixel_values=px, return_dict=True).pooler_output[0]
        embeds[ids == IMG] = feats
        kept = ranked_kept(model.model.language_model, embeds, ids[0] == IMG, PER_IMAGE // 4)
    patch = ta.apply(model, r=0)
    try:
        patch.modes = "llm"
        patch.llm = LLMReduction(layer=0, keep=0.25)
        out = generate(model, ids, torch.ones_like(ids), px)
        with torch.no_grad():
            cache_out = model(input_ids=ids, pixel_values=px, use_cache=True)
        state = cache_state(find_cache(cache_out))
    finally:
        patch.remove()
    assert torch.equal(state.kept[0], kept)
    # oracle: unpatched LM on the kept embeddings at their original positions
    tokens = greedy_on_kept(model, model.get_input_embeddings(), embeds, kept, NEW)
    assert out[0, -NEW:].tolist() == tokens
    assert torch.allclose(
        cache_out.logits[0, -1],
        model(inputs_embeds=embeds[:, kept], position_ids=kept[None]).logits[0, -1],
        atol=1e-4,
    )


@pytest.mark.parametrize("method", ["prune", "merge"])
def test_llm_batch_rows_equal_single_rows(model, method: str) -> None:
    prompts = rows(BATCH)
    ids, mask = left_pad(prompts)
    px = pixels(sum(BATCH))
    patch = ta.apply(model, r=0)
    try:
        patch.modes = "llm"
        patch.llm = LLMReduction(layer=2, keep=0.3, method=method, rank="text")
        out = generate(model, ids, mask, px)
        start = 0
        for b, p in enumerate(prompts):
            one = torch.tensor([p])
            sub = px[start : start + BATCH[b]] if BATCH[b] else None
            start += BATCH[b]
            alone = generate(model, one, torch.ones_like(one), sub)
            assert torch.equal(out[b, -NEW:], alone[0, -NEW:]), b
    finally:
        patch.remove()


def test_llm_reduces_the_late_layers_cache(model) -> None:
    ids = torch.tensor(rows([2]))
    patch = ta.apply(model, r=0)
    try:
        patch.llm = LLMReduction(layer=2, keep=0.5)
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixels(2), use_cache=True, turbo_mode="llm")
    finally:
        patch.remove()
    cache = find_cache(out)
    n = ids.shape[1]
    assert cache.get_seq_length(0) == cache.get_seq_length(1) == n
    assert cache.get_seq_length(2) == cache.get_seq_length(3) == n - PER_IMAGE
    assert out.logits.shape[1] == n - PER_IMAGE


# ---------------------------------------------------------- settings, undo
def test_errors_name_the_parameter(model) -> None:
    patch = ta.apply(model, r=2)
    try:
        assert isinstance(patch, LlavaPatch)
        with pytest.raises(ValueError, match="layer must be in \\[0, 3\\]"):
            patch.llm = LLMReduction(layer=4)
        with pytest.raises(ValueError, match="keep must be a fraction in \\(0, 1\\]"):
            LLMReduction(keep=0.0)
        with pytest.raises(ValueError, match="method must be one of"):
            LLMReduction(method="drop")
        with pytest.raises(ValueError, match="turbo mode must be"):
            patch.modes = "vision"
        ids, mask = left_pad(rows([1]))
        with pytest.raises(ValueError, match="turbo mode must be"):
            generate(model, ids, mask, pixels(1), turbo_mode="fast")
    finally:
        patch.remove()


def test_remove_restores_exactly() -> None:
    model = build(seed=3)
    ids, mask = left_pad(rows([1, 2]))
    px = pixels(3)
    reference = generate(model, ids, mask, px)  # transformers installs its lazy hooks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dicts = {name: dict(m.__dict__) for name, m in model.named_modules()}
    attn_impl = model.config.vision_config._attn_implementation
    patch = ta.apply(model, r=4)
    patch.modes = "both"
    generate(model, ids, mask, px)
    patch.remove()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for name, m in model.named_modules():
        assert set(m.__dict__) == set(dicts[name]), name
    assert model.config.vision_config._attn_implementation == attn_impl
    assert torch.equal(generate(model, ids, mask, px), reference)


# ------------------------------------------------- library compatibility
def cache_argument(model) -> str:
    """What the installed transformers calls the cache argument (renamed in 5.25)."""
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def decode_by_hand(model, ids: torch.Tensor, px: torch.Tensor, name: str) -> list[int]:
    """Greedy decoding written by hand, passing the cache back as ``name``."""
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px, use_cache=True)
        cache, tokens = find_cache(out), []
        for _ in range(NEW):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt))
            out = model(input_ids=nxt, use_cache=True, **{name: cache})
    return tokens


def test_llm_decode_finds_the_cache_under_either_name(model) -> None:
    """The decode steps find the prefill's state on the cache whatever keyword carries it
    (``past_key_values`` before transformers 5.25, ``cache`` and its alias after)."""
    ids = torch.tensor(rows([1]))
    px = pixels(1)
    patch = ta.apply(model, r=0)
    try:
        patch.modes = "llm"
        patch.llm = LLMReduction(layer=2, keep=0.3)
        reference = generate(model, ids, torch.ones_like(ids), px)[0, -NEW:].tolist()
        for name in sorted({cache_argument(model), "past_key_values"}):
            assert decode_by_hand(model, ids, px, name) == reference, name
    finally:
        patch.remove()
    unpatched = generate(model, ids, torch.ones_like(ids), px)[0, -NEW:].tolist()
    assert unpatched != reference  # keeping 30 % of the image changed the answer


def test_llm_cache_used_outside_the_patched_model_raises_a_clear_error(model) -> None:
    """Decoding by calling the language model directly would hand layers >= K a mask over
    the full prompt and a cache of the kept tokens: refused by name, not a shape error."""
    ids = torch.tensor(rows([1]))
    patch = ta.apply(model, r=0)
    try:
        patch.llm = LLMReduction(layer=2, keep=0.5)
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixels(1), use_cache=True, turbo_mode="llm")
            step = model.get_input_embeddings()(torch.tensor([[5]]))
            language = model.model.language_model
            with pytest.raises(RuntimeError, match="llava \\(llm mode\\): decoder layer 2 "):
                language(inputs_embeds=step, **{cache_argument(language): find_cache(out)})
    finally:
        patch.remove()


class RenamedKeywordsLayer(LlamaDecoderLayer):
    """A decoder layer as a future transformers could write it: the mask and the rotary
    embeddings under other keyword names (what LLM mode hands layers >= K by name)."""

    def forward(self, hidden_states, mask=None, rotary=None, **kwargs):  # type: ignore[override]
        return super().forward(
            hidden_states, attention_mask=mask, position_embeddings=rotary, **kwargs
        )


def test_llm_mode_refused_at_apply_when_the_library_changed() -> None:
    """Feature detection at apply: the error names the adapter, what is missing, the
    installed transformers and the tested range; tower mode is still offered."""
    model = build(seed=5)
    for layer in model.model.language_model.layers:
        layer.__class__ = RenamedKeywordsLayer
    patch = ta.apply(model, r=2)  # tower mode (the default here) does not need the decoder
    try:
        assert patch.modes == {"tower"}
        with pytest.raises(IncompatibleLibraryError) as raised:
            patch.modes = "llm"
        message = str(raised.value)
        assert message.startswith("llava (llm mode) cannot patch this model")
        assert (
            "RenamedKeywordsLayer.forward to take attention_mask and position_embeddings" in message
        )
        assert f"transformers {transformers.__version__} does not provide" in message
        assert f"tested with transformers {versions_tested('transformers')}" in message
        ids, mask = left_pad(rows([1]))
        with pytest.raises(IncompatibleLibraryError, match="llava \\(llm mode\\)"):
            generate(model, ids, mask, pixels(1), turbo_mode="llm")
        # the layers were left as they are: the (renamed) model still runs unpatched
        assert all("forward" not in vars(layer) for layer in model.model.language_model.layers)
    finally:
        patch.remove()
