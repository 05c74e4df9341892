"""PyramidDrop (staged LLM-mode pruning) on a tiny LLaVA-1.5.

Oracle: support/pyramid_oracle.py, an eager float64 copy of the model run stage by stage
with the ranking attention computed by hand; batches against rows generated alone.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")
from support.pyramid_oracle import pyramid_greedy, pyramid_prefill, sparse_prefill, sparse_replay
from support.tiny_llava import IMG, PER_IMAGE, build, left_pad, pixels, rows

import turbo_adapters as ta
from turbo_adapters.families.llava.llm import LLMReduction, cache_state, find_cache

NEW = 5
PYRAMID = LLMReduction.pyramid_drop(layers=(1, 2, 3), ratio=0.5)  # 32, 16, 8 of 64


@pytest.fixture(scope="module")
def model():
    return build(seed=5)


def generate(model, ids, mask, px) -> torch.Tensor:
    extra = {} if px is None else {"pixel_values": px}
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **extra
        )


def test_pyramid_settings_and_errors() -> None:
    assert PYRAMID.schedule == ((1, 0.5), (2, 0.25), (3, 0.125))
    assert PYRAMID.last_layer == 3 and PYRAMID.method == "prune" and PYRAMID.rank == "last"
    default = LLMReduction.pyramid_drop()
    assert default.schedule == ((8, 0.5), (16, 0.25), (24, 0.125))
    with pytest.raises(ValueError, match="stages: each layer must be an int > the previous"):
        LLMReduction(layer=2, keep=0.5, stages=((2, 0.25),))
    with pytest.raises(ValueError, match=r"stages: each keep must be a fraction in \(0, 0\.5\]"):
        LLMReduction(layer=1, keep=0.5, stages=((2, 0.75),))
    with pytest.raises(ValueError, match="stages must hold"):
        LLMReduction(layer=1, stages=((2,),))
    with pytest.raises(ValueError, match="ratio must be a fraction"):
        LLMReduction.pyramid_drop(ratio=0.0)


def test_pyramid_refuses_a_stage_below_the_decoder(model) -> None:
    patch = ta.apply(model, r=0)
    try:
        with pytest.raises(ValueError, match=r"llm layer must be in \[0, 3\], got 4"):
            patch.llm = LLMReduction(layer=1, stages=((4, 0.25),))
    finally:
        patch.remove()


def test_pyramid_matches_the_float64_oracle(model) -> None:
    ids = torch.tensor(rows([1]))
    px = pixels(1, seed=3)
    reference = copy.deepcopy(model).double()
    reference.config.text_config._attn_implementation = "eager"
    with torch.no_grad():
        embeds = reference.get_input_embeddings()(ids)
        feats = reference.model.get_image_features(
            pixel_values=px.double(), return_dict=True
        ).pooler_output[0]
        embeds[ids == IMG] = feats
        decoder = reference.model.language_model
        counts = [(layer, math.ceil(keep * PER_IMAGE)) for layer, keep in PYRAMID.schedule]
        sets = pyramid_prefill(decoder, embeds, ids[0] == IMG, counts)
        tokens, logits = pyramid_greedy(
            decoder, reference.lm_head, reference.get_input_embeddings(), embeds, sets, NEW
        )
    patch = ta.apply(model, r=0)
    try:
        patch.modes = "llm"
        patch.llm = PYRAMID
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=px, use_cache=True)
        state = cache_state(find_cache(out))
        generated = generate(model, ids, torch.ones_like(ids), px)
    finally:
        patch.remove()
    assert [stage.layer for stage in state.stages] == [1, 2, 3]
    text = int((ids[0] != IMG).sum())
    for stage, (layer, count) in zip(state.stages, counts, strict=True):
        assert stage.kept.shape[1] == text + count
        assert torch.equal(stage.kept[0], sets[layer]), layer
    torch.testing.assert_close(out.logits[0, -1].double(), logits, atol=2e-4, rtol=1e-4)
    assert generated[0, -NEW:].tolist() == tokens
    cache = find_cache(out)
    n = ids.shape[1]
    lengths = [cache.get_seq_length(i) for i in range(4)]
    assert lengths == [n, text + 32, text + 16, text + 8]
    unpatched = generate(model, ids, torch.ones_like(ids), px)[0, -NEW:].tolist()
    assert unpatched != tokens or logits.argmax() != out.logits[0, -1].argmax()


@pytest.mark.parametrize("method", ["prune", "merge"])
def test_pyramid_batch_rows_equal_single_rows(model, method: str) -> None:
    batch = [2, 1, 0]
    prompts = rows(batch)
    ids, mask = left_pad(prompts)
    px = pixels(sum(batch))
    settings = LLMReduction(
        layer=1, keep=0.5, method=method, rank="last", stages=((2, 0.3), (3, 0.1))
    )
    patch = ta.apply(model, r=0)
    try:
        patch.modes = "llm"
        patch.llm = settings
        out = generate(model, ids, mask, px)
        start = 0
        for b, p in enumerate(prompts):
            one = torch.tensor([p])
            sub = px[start : start + batch[b]] if batch[b] else None
            start += batch[b]
            alone = generate(model, one, torch.ones_like(one), sub)
            assert torch.equal(out[b, -NEW:], alone[0, -NEW:]), b
    finally:
        patch.remove()


def test_single_stage_state_is_unchanged(model) -> None:
    """One stage keeps the FastV behaviour: the state's first stage is the whole state."""
    ids = torch.tensor(rows([1]))
    patch = ta.apply(model, r=0)
    try:
        patch.llm = LLMReduction(layer=2, keep=0.25)
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixels(1), use_cache=True, turbo_mode="llm")
    finally:
        patch.remove()
    state = cache_state(find_cache(out))
    assert len(state.stages) == 1 and state.layer == 2
    assert state.kept.shape[1] == ids.shape[1] - PER_IMAGE + 16


# ---------------------------------------------------------------- SparseVLM
SPARSE = LLMReduction.sparse_vlm(counts=(40, 20, 9), layers=(1, 2, 3), image_tokens=PER_IMAGE)
# more recycled: 40 dropped at the first stage -> 21 recycled into 3 clusters (k-NN density, k=3)
SPARSE_WIDE = LLMReduction.sparse_vlm(
    counts=(24, 12, 6), layers=(1, 2, 3), image_tokens=PER_IMAGE, recycle=0.5
)


def test_sparse_vlm_settings() -> None:
    default = LLMReduction.sparse_vlm()
    assert default.rank == "raters" and default.recycle == 0.3
    assert [layer for layer, _ in default.schedule] == [3, 7, 16]
    assert [round(keep * 576) for _, keep in default.schedule] == [66, 30, 17]
    with pytest.raises(ValueError, match="recycle needs method='prune'"):
        LLMReduction(method="merge", recycle=0.3)
    with pytest.raises(ValueError, match=r"recycle must be a fraction in \[0, 1\]"):
        LLMReduction(recycle=1.5)
    with pytest.raises(ValueError, match="counts and layers must be non-empty and of one length"):
        LLMReduction.sparse_vlm(counts=(1, 2), layers=(1,))


@pytest.mark.parametrize("settings", [SPARSE, SPARSE_WIDE], ids=["narrow", "wide"])
def test_sparse_vlm_matches_the_float64_oracle(model, settings: LLMReduction) -> None:
    ids = torch.tensor(rows([1]))
    px = pixels(1, seed=4)
    reference = copy.deepcopy(model).double()
    reference.config.text_config._attn_implementation = "eager"
    with torch.no_grad():
        embeds = reference.get_input_embeddings()(ids)
        feats = reference.model.get_image_features(
            pixel_values=px.double(), return_dict=True
        ).pooler_output[0]
        embeds[ids == IMG] = feats
        counts = [(layer, math.ceil(keep * PER_IMAGE - 1e-9)) for layer, keep in settings.schedule]
        decoder = reference.model.language_model
        kept, sizes, last, plan = sparse_prefill(
            decoder, embeds, ids[0] == IMG, counts, settings.recycle
        )
        logits = reference.lm_head(last)[0]
        # greedy decoding with the prefill's decisions replayed, recomputed in full each step
        tokens, x = [], embeds
        for _ in range(NEW):
            step = reference.lm_head(sparse_replay(decoder, x, plan, ids.shape[1]))[0]
            tokens.append(int(step.argmax()))
            x = torch.cat([x, reference.get_input_embeddings()(torch.tensor([tokens[-1:]]))], 1)
        assert torch.allclose(
            reference.lm_head(sparse_replay(decoder, embeds, plan, ids.shape[1]))[0], logits
        )
    patch = ta.apply(model, r=0)
    try:
        patch.modes = "llm"
        patch.llm = settings
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=px, use_cache=True)
        state = cache_state(find_cache(out))
        generated = generate(model, ids, torch.ones_like(ids), px)[0, -NEW:].tolist()
    finally:
        patch.remove()
    assert generated == tokens
    for stage in state.stages:
        assert torch.equal(stage.kept[0], kept[stage.layer]), stage.layer
        torch.testing.assert_close(stage.size[0].double(), sizes[stage.layer])
    recycled = state.stages[0].size[0]
    assert (recycled > 1).sum() == (3 if settings is SPARSE_WIDE else 1)  # clusters formed
    torch.testing.assert_close(out.logits[0, -1].double(), logits, atol=2e-4, rtol=1e-4)


def test_sparse_vlm_batch_rows_equal_single_rows(model) -> None:
    batch = [2, 1, 0]
    prompts = rows(batch)
    ids, mask = left_pad(prompts)
    px = pixels(sum(batch))
    patch = ta.apply(model, r=0)
    try:
        patch.modes = "llm"
        patch.llm = SPARSE
        out = generate(model, ids, mask, px)
        start = 0
        for b, p in enumerate(prompts):
            one = torch.tensor([p])
            sub = px[start : start + batch[b]] if batch[b] else None
            start += batch[b]
            alone = generate(model, one, torch.ones_like(one), sub)
            assert torch.equal(out[b, -NEW:], alone[0, -NEW:]), b
    finally:
        patch.remove()
