"""BLIP-2 / InstructBLIP cross-modal guidance: the Q-Former's first cross-attention ranks.

Tiny random-init models (OPT language model, ITM retrieval, InstructBLIP with its
instruction), with a Q-Former of three layers that cross-attends every second layer
(layers 0 and 2), so the reduced image must reach a cross-attention the ranking did not
run in. Oracles: the unpatched model (logits, greedy ids, ITM/ITC scores, after
``remove``), per-row calls, redundancy-only decisions, and an unpatched Q-Former over
copies of merged tokens (each repeated as many times as it has members) for ``log(size)``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from support.tiny_blip import build as build_blip  # noqa: E402
from support.tiny_blip import text as blip_text  # noqa: E402
from support.tiny_blip2 import TOKENS, images  # noqa: E402
from support.tiny_blip2 import build as build_blip2  # noqa: E402
from support.tiny_blip2_guided import build, itm, prompt, words  # noqa: E402

import turbo_adapters as ta  # noqa: E402
from turbo_adapters.families import blip, blip2  # noqa: E402
from turbo_adapters.families.blip import guided  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cross_lengths(model: nn.Module) -> dict[int, list[int]]:
    """Image lengths every Q-Former cross-attention receives, by layer."""
    seen: dict[int, list[int]] = {}
    for index, layer in enumerate(model.qformer.encoder.layer):
        if layer.has_cross_attention:
            seen[index] = []
            layer.crossattention.attention.register_forward_pre_hook(
                lambda m, a, kw, i=index: seen[i].append(kw["encoder_hidden_states"].shape[1]),
                with_kwargs=True,
            )
    return seen


def itc(model: nn.Module, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    return out.logits_per_image


# ------------------------------------------------------------ r = 0 is the model
@torch.no_grad()
@pytest.mark.parametrize("bias", [False, True])
def test_r0_equals_unpatched(bias: bool) -> None:
    pixels = images(3)
    model = build("Blip2ForConditionalGeneration")
    ids = prompt(3)
    logits = model(pixel_values=pixels, input_ids=ids).logits
    greedy = model.generate(pixel_values=pixels, max_new_tokens=5)
    patch = ta.apply(model, r=0)
    site = blip2.use_cross_modal_guidance(patch, r=0)
    if bias:
        blip2.use_size_bias_downstream(patch)
    torch.testing.assert_close(model(pixel_values=pixels, input_ids=ids).logits, logits)
    assert torch.equal(model.generate(pixel_values=pixels, max_new_tokens=5), greedy)
    assert site.last_state.token_counts == [TOKENS]

    instruct = build("InstructBlipForConditionalGeneration")
    instruction = words(3, seed=1)
    logits = instruct(pixel_values=pixels, input_ids=ids, qformer_input_ids=instruction).logits
    greedy = instruct.generate(pixel_values=pixels, qformer_input_ids=instruction, max_new_tokens=5)
    patch = ta.apply(instruct, r=0)
    blip2.use_cross_modal_guidance(patch, r=0, reduce="prune")
    if bias:
        blip2.use_size_bias_downstream(patch)
    got = instruct(pixel_values=pixels, input_ids=ids, qformer_input_ids=instruction).logits
    torch.testing.assert_close(got, logits)
    got = instruct.generate(pixel_values=pixels, qformer_input_ids=instruction, max_new_tokens=5)
    assert torch.equal(got, greedy)

    retrieval = build("Blip2ForImageTextRetrieval")
    scores = itm(retrieval, pixels, ids), itc(retrieval, pixels, ids)
    patch = ta.apply(retrieval, r=0)
    blip2.use_cross_modal_guidance(patch, r=0, pool="max")
    if bias:
        blip2.use_size_bias_downstream(patch)
    torch.testing.assert_close(itm(retrieval, pixels, ids), scores[0])
    torch.testing.assert_close(itc(retrieval, pixels, ids), scores[1])


# -------------------------------------------------------- reduction in generation
@torch.no_grad()
@pytest.mark.parametrize(
    "cls", ["Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration"]
)
def test_generate_reduces_once_for_batches_and_beams(cls: str) -> None:
    model = build(cls)
    patch = ta.apply(model, r=2)
    site = blip2.use_cross_modal_guidance(patch, r=3)
    seen = cross_lengths(model)
    calls = [0]
    model.qformer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    extra: dict[str, Any] = {}
    pixels = images(3)
    if cls.startswith("InstructBlip"):
        extra = {"qformer_input_ids": words(3, seed=1)}
    greedy = model.generate(pixel_values=pixels, max_new_tokens=4, min_new_tokens=4, **extra)
    assert calls == [1] and greedy.shape[0] == 3
    assert patch.sites["vision"].last_state.token_counts == [15, 13, 11, 9]
    assert site.last_state.token_counts == [6]
    assert seen == {0: [6], 2: [6]}  # both cross-attentions see the reduced image
    for b in (0, 2):  # each row as if alone, batch 1
        alone = {k: v[b : b + 1] for k, v in extra.items()}
        out = model.generate(
            pixel_values=pixels[b : b + 1], max_new_tokens=4, min_new_tokens=4, **alone
        )
        assert torch.equal(out[0], greedy[b])
    beams = model.generate(
        pixel_values=pixels, max_new_tokens=4, min_new_tokens=4, num_beams=3, **extra
    )
    assert calls == [4] and beams.shape[0] == 3 and site.last_state.token_counts == [6]


@torch.no_grad()
def test_retrieval_scores_with_reduction() -> None:
    model = build("Blip2ForImageTextRetrieval")
    patch = ta.apply(model, r=2)
    site = blip2.use_cross_modal_guidance(patch, r=4, reduce="prune")
    seen = cross_lengths(model)
    pixels, ids = images(3), prompt(3)
    scores = itm(model, pixels, ids)
    assert scores.shape == (3, 2) and torch.isfinite(scores).all()
    assert seen == {0: [5], 2: [5]} and site.last_state.token_counts == [5]
    contrastive = itc(model, pixels, ids)  # the queries alone rank here
    assert contrastive.shape == (3, 3) and torch.isfinite(contrastive).all()
    assert seen[0][-1] == 5


# ----------------------------------------------------------- what the ranking reads
def _decisions(model: nn.Module, site: Any, **inputs: Any) -> torch.Tensor:
    model(**inputs)
    return site.last_state.source


@torch.no_grad()
@pytest.mark.parametrize("reduce", ["merge", "prune"])
@pytest.mark.parametrize("pool", ["mean", "max"])
def test_instruction_changes_decisions(reduce: str, pool: str) -> None:
    model = build("InstructBlipForConditionalGeneration")
    patch = ta.apply(model, r=0)
    site = blip2.use_cross_modal_guidance(
        patch, r=5, reduce=reduce, pool=pool, mode="semantics", trace_source=True
    )
    pixels, ids = images(2), prompt(2)
    first = _decisions(
        model, site, pixel_values=pixels, input_ids=ids, qformer_input_ids=words(2, 1)
    )
    again = _decisions(
        model, site, pixel_values=pixels, input_ids=ids, qformer_input_ids=words(2, 1)
    )
    other = _decisions(
        model, site, pixel_values=pixels, input_ids=ids, qformer_input_ids=words(2, 2)
    )
    assert torch.equal(first, again)
    assert not torch.equal(first, other)  # another instruction, other image tokens kept
    if reduce == "prune":  # survivors keep their sizes: nothing was averaged in
        assert torch.all(site.last_state.size == 1)


@torch.no_grad()
def test_itm_text_changes_decisions() -> None:
    model = build("Blip2ForImageTextRetrieval")
    patch = ta.apply(model, r=0)
    site = blip2.use_cross_modal_guidance(patch, r=5, mode="semantics", trace_source=True)
    pixels = images(2)
    first = _decisions(
        model, site, pixel_values=pixels, input_ids=prompt(2, 1), use_image_text_matching_head=True
    )
    other = _decisions(
        model, site, pixel_values=pixels, input_ids=prompt(2, 2), use_image_text_matching_head=True
    )
    assert not torch.equal(first, other)


@torch.no_grad()
def test_plain_blip2_queries_ignore_the_prompt() -> None:
    """The prompt reaches the language model only; the queries that rank read no text."""
    model = build("Blip2ForConditionalGeneration")
    patch = ta.apply(model, r=0)
    site = blip2.use_cross_modal_guidance(patch, r=5, mode="semantics", trace_source=True)
    pixels = images(2)
    first = _decisions(model, site, pixel_values=pixels, input_ids=prompt(2, 1))
    other = _decisions(model, site, pixel_values=pixels, input_ids=prompt(2, 2))
    assert torch.equal(first, other)
    # but the ranking is the queries', not redundancy's: semantics changes the decisions
    patch.configure(site=blip2.CROSS_SITE, mode="redundancy")
    assert not torch.equal(_decisions(model, site, pixel_values=pixels, input_ids=prompt(2)), first)


@torch.no_grad()
def test_alpha0_equals_redundancy_and_remove_restores() -> None:
    model = build("InstructBlipForConditionalGeneration")
    pixels, ids, instruction = images(2), prompt(2), words(2, 1)

    def logits() -> torch.Tensor:
        return model(pixel_values=pixels, input_ids=ids, qformer_input_ids=instruction).logits

    reference = logits()
    patch = ta.apply(model, r=2)
    site = blip2.use_cross_modal_guidance(patch, r=2, trace_source=True, alpha=0.0)
    alpha0, source = logits(), site.last_state.source
    patch.configure(site=blip2.CROSS_SITE, mode="redundancy", alpha=3.0)
    torch.testing.assert_close(logits(), alpha0)
    assert torch.equal(site.last_state.source, source)
    patch.configure(site=blip2.CROSS_SITE, mode="semantics")
    assert not torch.equal(_decisions(model, site, pixel_values=pixels, input_ids=ids,
                                      qformer_input_ids=instruction), source)  # fmt: skip
    blip2.use_size_bias_downstream(patch)
    ta.remove(model)
    assert torch.equal(logits(), reference)
    assert "forward" not in model.qformer.__dict__
    assert all("forward" not in m.__dict__ for m in model.qformer.modules())


# ------------------------------------------------------------------ sizes and bias
def _duplicated(image: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Every merged token repeated as many times as it has members: attending to these
    copies is exactly proportional attention over the merged tokens."""
    return image.gather(1, source.unsqueeze(-1).expand(-1, -1, image.shape[-1]))


def _qformer_over(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    queries = model.query_tokens.expand(image.shape[0], -1, -1)
    mask = torch.ones(image.shape[:2], dtype=torch.long)
    return model.qformer(
        query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask
    ).last_hidden_state


def _reduced_image(model: nn.Module) -> list[torch.Tensor]:
    got: list[torch.Tensor] = []
    model.qformer.encoder.layer[0].crossattention.attention.register_forward_pre_hook(
        lambda m, a, kw: got.append(kw["encoder_hidden_states"]), with_kwargs=True
    )
    return got


@torch.no_grad()
def test_size_bias_equals_attending_to_copies() -> None:
    model = build("Blip2Model")
    pixels = images(2)

    def features() -> torch.Tensor:
        out = model.get_qformer_features(pixel_values=pixels)
        return getattr(out, "last_hidden_state", out)

    patch = ta.apply(model, r=2, trace_source=True)
    plain = features()
    blip2.use_size_bias_downstream(patch)
    biased = features()
    image = model.vision_model(pixel_values=pixels).last_hidden_state
    copies = _duplicated(image, patch.last_state.source)
    assert copies.shape[1] == TOKENS and ta.token_sizes(copies) is None
    torch.testing.assert_close(biased, _qformer_over(model, copies), atol=2e-5, rtol=2e-5)
    assert not torch.allclose(biased, plain, atol=1e-4)

    # merged again by the guided site: sizes compose, the bias follows
    site = blip2.use_cross_modal_guidance(patch, r=3, trace_source=True)
    reduced = _reduced_image(model)
    guided = features()
    assert reduced[-1].shape[1] == TOKENS - 4 * 2 - 3
    assert float(site.last_state.size.sum(dim=1).min()) == TOKENS  # every token counted once
    source = site.last_state.source.gather(1, patch.sites["vision"].last_state.source)
    patch.configure(site=blip2.CROSS_SITE, r=0)  # the oracle's image must not be reduced
    oracle = _qformer_over(model, _duplicated(reduced[-1], source))
    torch.testing.assert_close(guided, oracle, atol=2e-5, rtol=2e-5)


@torch.no_grad()
@pytest.mark.parametrize("pool", ["mean", "max"])
def test_ranking_is_the_first_cross_attention(pool: str) -> None:
    """The semantic value against the library's eager cross-attention probabilities, over
    copies of the merged tokens (summed per merged token: proportional attention)."""
    model = build("Blip2Model")
    model.qformer.set_attn_implementation("eager")
    patch = ta.apply(model, r=2, trace_source=True)
    image = model.vision_model(pixel_values=images(2)).last_hidden_state
    source = patch.last_state.source
    entering: list[torch.Tensor] = []
    first = model.qformer.encoder.layer[0].crossattention.attention
    first.register_forward_pre_hook(
        lambda m, a, kw: entering.append(kw["hidden_states"]), with_kwargs=True
    )
    queries = model.query_tokens.expand(2, -1, -1)
    out = model.qformer(
        query_embeds=queries,
        encoder_hidden_states=_duplicated(image, source),
        encoder_attention_mask=torch.ones(2, TOKENS, dtype=torch.long),
        output_attentions=True,
    )
    probs = out.cross_attentions[0]  # (B, H, queries, TOKENS) over the copies
    index = source[:, None, None].expand(-1, *probs.shape[1:3], -1)
    grouped = probs.new_zeros(*probs.shape[:3], image.shape[1]).scatter_add_(-1, index, probs)
    expected = grouped.mean(dim=1)
    expected = expected.mean(dim=1) if pool == "mean" else expected.amax(dim=1)

    width = first.attention_head_size
    q = first.query(entering[-1]).unflatten(-1, (-1, width)).transpose(1, 2)
    k = first.key(image).unflatten(-1, (-1, width)).transpose(1, 2)
    bias = ta.token_sizes(image).log().transpose(1, 2).unsqueeze(1)  # (B, 1, 1, N)
    got = guided.rank_image(q, k, scale=first.scaling, pool=pool, bias=bias)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, guided.rank_image(q, k, scale=first.scaling, pool=pool))


@torch.no_grad()
def test_prune_keeps_the_survivors_sizes() -> None:
    model = build("Blip2Model")
    pixels = images(2)
    patch = ta.apply(model, r=2)
    site = blip2.use_cross_modal_guidance(patch, r=3, reduce="prune")
    reduced = _reduced_image(model)
    model.get_qformer_features(pixel_values=pixels)
    image = model.vision_model(pixel_values=pixels).last_hidden_state
    vision = ta.token_sizes(image)
    assert reduced[-1].shape[1] == image.shape[1] - 3
    for b in range(2):  # every survivor is a tower token, untouched, with its size
        match = (reduced[-1][b, :, None] == image[b, None]).all(-1)
        assert torch.all(match.sum(-1) == 1)
        index = match.float().argmax(-1)
        assert torch.equal(site.last_state.size[b], vision[b, index])
    assert float(site.last_state.size.sum(dim=1).max()) < TOKENS  # pruned tokens took theirs


@torch.no_grad()
def test_sizes_survive_the_qformer_fp32_cast() -> None:
    """A half-precision tower hands the fp32 Q-Former a cast copy (which drops the sizes)."""
    model = build("Blip2Model")
    model.vision_model.to(torch.bfloat16)
    patch = ta.apply(model, r=3)
    site = blip2.use_cross_modal_guidance(patch, r=2)
    blip2.use_size_bias_downstream(patch)
    model.get_qformer_features(pixel_values=images(2).to(torch.bfloat16))
    assert site.last_state.size is not None
    assert float(site.last_state.size.sum(dim=1).min()) == TOKENS


# ------------------------------------------------------------------------ errors
def test_bad_options_and_models() -> None:
    patch = ta.apply(build("Blip2ForConditionalGeneration"), r=2)
    with pytest.raises(ValueError, match="reduce must be one of"):
        blip2.use_cross_modal_guidance(patch, r=2, reduce="drop")
    with pytest.raises(ValueError, match="pool must be one of"):
        blip2.use_cross_modal_guidance(patch, r=2, pool="median")
    blip2.use_cross_modal_guidance(patch, r=2)
    with pytest.raises(ValueError, match="installed already"):
        blip2.use_cross_modal_guidance(patch, r=2)
    with pytest.raises(TypeError, match="hf-blip2 or hf-instructblip"):
        blip2.use_cross_modal_guidance(ta.apply(build_blip_itm(), r=2), r=2)
    tower = ta.apply(build_vision(), r=2)
    with pytest.raises(TypeError, match="no Q-Former"):
        blip2.use_size_bias_downstream(tower)


@torch.no_grad()
def test_a_padded_image_is_refused() -> None:
    model = build("Blip2Model")
    blip2.use_cross_modal_guidance(ta.apply(model, r=0), r=2)
    image = model.vision_model(pixel_values=images(1)).last_hidden_state
    mask = torch.ones(image.shape[:2], dtype=torch.long)
    mask[:, -2:] = 0
    with pytest.raises(ValueError, match="encoder_attention_mask masks image tokens"):
        model.qformer(
            query_embeds=model.query_tokens,
            encoder_hidden_states=image,
            encoder_attention_mask=mask,
        )


def build_blip_itm() -> nn.Module:
    return build_blip("BlipForImageTextRetrieval")


def build_vision() -> nn.Module:
    return build_blip2("Blip2VisionModel")


def test_blip_and_blip2_share_the_site_name() -> None:
    assert blip.CROSS_SITE == blip2.CROSS_SITE == "text-guided"


def _blip_itm() -> tuple[nn.Module, Any, nn.Module, Any]:
    model = build_blip("BlipForImageTextRetrieval")
    first = model.text_encoder.encoder.layer[0].crossattention
    return (
        model,
        blip,
        first,
        lambda: model(input_ids=blip_text(2), pixel_values=images(2)).itm_score,
    )


def _blip2_itm() -> tuple[nn.Module, Any, nn.Module, Any]:
    model = build("Blip2ForImageTextRetrieval")
    first = model.qformer.encoder.layer[0].crossattention
    return model, blip2, first, lambda: itm(model, images(2), prompt(2))


@torch.no_grad()
@pytest.mark.parametrize("make", [_blip_itm, _blip2_itm], ids=["blip", "blip2"])
def test_a_bypassed_first_cross_attention_is_reported(make: Any) -> None:
    """Another library replaces layer 0's cross-attention forward after the patch: a later
    cross-attention must not rank in its place (with other rows, silently), and the call
    says that nothing was reduced."""
    import types

    model, family, first, scores = make()
    reference = scores()
    site = family.use_cross_modal_guidance(ta.apply(model, r=0), r=4)
    first.forward = types.MethodType(type(first).forward, first)
    with pytest.warns(ta.TurboBypassWarning, match="first cross-attention did not go through"):
        got = scores()
    torch.testing.assert_close(got, reference)  # every cross-attention read the full image
    assert site.last_state.token_counts == []
