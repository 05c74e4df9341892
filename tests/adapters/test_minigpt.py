"""MiniGPT-v2 assembled from timm Eva + transformers LLaMA + peft LoRA, with Turbo in the
tower, in the language model (LLM mode), or both.

Oracles: the unpatched model (r = 0 / keep = 1 token for token, after ``remove``); a
count loop written here for the multiple-of-4 rule; each row generated alone (left
padded batches in LLM mode); the unpatched LLaMA run on the kept embeddings at their
original positions, with the ranking recomputed in support/fastv_oracle.py (LLM mode at K = 0);
for the loader, the model whose weights were saved in the official layout.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("timm")
from support.fastv_oracle import greedy_on_kept, ranked_kept
from transformers import LlamaConfig, LlamaForCausalLM

import turbo_adapters as ta
from turbo_adapters.families.llava.llm import LLMReduction, cache_state, find_cache
from turbo_adapters.families.llava.modes import VisionLanguagePatch
from turbo_adapters.models import (
    MiniGPTv2,
    MiniGPTv2Config,
    load_minigptv2,
    official_lora_key,
    prompt_layout,
)

NEW = 5
PATCHES = 64  # (56 / 7) ** 2


def config(depth: int = 5) -> MiniGPTv2Config:
    llama = LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=100, pad_token_id=0,
    )  # fmt: skip
    return MiniGPTv2Config(
        image_size=56, patch_size=7, vision_width=32, vision_depth=depth, vision_heads=4,
        vision_mlp_ratio=2.0, lora_r=4, lora_alpha=8, llama=llama,
    )  # fmt: skip


def randomize(model: MiniGPTv2, seed: int = 0, only: tuple[str, ...] = ()) -> MiniGPTv2:
    """Weights large enough that answers vary; LoRA B non-zero so LoRA matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only and not any(part in name for part in only):
                continue
            if p.dim() == 2 and not name.startswith("visual_encoder"):
                p.copy_(torch.randn(p.shape, generator=g) * 1.2 / p.shape[1] ** 0.5)
            elif "q_bias" in name or "v_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> MiniGPTv2:
    torch.manual_seed(0)
    return randomize(MiniGPTv2(config()))


def prompts(batch: int) -> tuple[list[list[int]], list[list[int]]]:
    before = [[1, 5 + b, 6][: 2 + b % 2] for b in range(batch)]
    after = [[8, 9, 10 + b][: 3 - b % 2] for b in range(batch)]
    return before, after


def pixels(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(1))


def answer(model: MiniGPTv2, batch: int, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            pixels(batch), *prompts(batch), max_new_tokens=NEW, min_new_tokens=NEW, **kw
        )


def test_registry(model) -> None:
    assert ta.get_adapter("minigpt-v2").name == "minigpt-v2"
    assert ta.adapter_for_model(model).name == "minigpt-v2"


def test_r0_equals_unpatched_greedy(model) -> None:
    reference = answer(model, 3)
    assert len(set(reference.flatten().tolist())) > 3
    with ta.patched(model, r=0):
        assert torch.equal(answer(model, 3), reference)


@pytest.mark.parametrize("batch", [1, 3])
def test_r_positive_generates_to_completion(model, batch: int) -> None:
    with ta.patched(model, r=3) as patch:
        out = answer(model, batch)
        with torch.no_grad():
            image = model.encode_image(pixels(batch))
        resolved = patch.last_state.resolved
    assert out.shape == (batch, NEW)
    assert resolved.meets_rule
    assert image.shape[1] == (resolved.counts[-1] - 1) // 4 < PATCHES // 4


def _counts(tokens: int, schedule: list[int]) -> list[int]:
    out = []
    for r in schedule:
        tokens -= max(min(r, (tokens - 1) // 2), 0)
        out.append(tokens)
    return out


@pytest.mark.parametrize("r", range(0, 14))
def test_multiple_of_four_for_every_r(model, r: int) -> None:
    with ta.patched(model, r=r) as patch, torch.no_grad():
        image = model.encode_image(pixels(2))
        state = patch.last_state
    resolved = state.resolved
    final = state.token_counts[-1]
    assert (final - 1) % 4 == 0 and resolved.meets_rule
    assert image.shape[1] == (final - 1) // 4
    plain = _counts(PATCHES + 1, [r] * 5)
    if (plain[-1] - 1) % 4:  # the rule changed the last blocks' r: reported
        assert resolved.adjusted is not None and resolved.unadjusted is not None
        # the nearest allowed count below (merge a little more), never padding
        assert final == plain[-1] - (plain[-1] - 1) % 4
        assert list(resolved.r) != list(resolved.unadjusted)
        assert _counts(PATCHES + 1, list(resolved.unadjusted))[-1] == plain[-1]
    else:
        assert resolved.adjusted is None and final == plain[-1]


def test_unpatched_concat_refuses_a_bad_count() -> None:
    cfg = config(depth=1)
    cfg.image_size = 49  # 7 x 7 patches
    small = MiniGPTv2(cfg).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="multiple of 4"):
        small.encode_image(torch.randn(1, 3, 49, 49))


def test_remove_restores_exactly(model) -> None:
    reference = answer(model, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dicts = {n: set(m.__dict__) for n, m in model.named_modules()}
    patch = ta.apply(model, r=4)
    patch.llm = LLMReduction(layer=1, keep=0.5, method="merge")
    patch.modes = "both"
    assert not torch.equal(answer(model, 2), reference)
    patch.remove()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(set(m.__dict__) == dicts[n] for n, m in model.named_modules())
    assert torch.equal(answer(model, 2), reference)


# ----------------------------------------------------------------- LLM mode
def test_prompt_layout_matches_embed_prompts(model) -> None:
    before, after = prompts(3)
    with torch.no_grad():
        embeds, mask = model.embed_prompts(pixels(3), before, after)
        image = model.encode_image(pixels(3))
    layout_mask, image_mask = prompt_layout(before, after, image.shape[1])
    assert torch.equal(layout_mask, mask)
    assert torch.equal(embeds[image_mask].view_as(image), image)


@pytest.mark.parametrize("mode", ["llm", "both"])
def test_llm_keep_all_equals_unpatched_greedy(model, mode: str) -> None:
    reference = answer(model, 3)  # prompts of different lengths: left padded
    patch = ta.apply(model, r=0)
    try:
        patch.llm = LLMReduction(layer=1, keep=1.0)
        assert torch.equal(answer(model, 3, turbo_mode=mode), reference)
        patch.r = 5  # per call: "none" is the unpatched model, whatever the settings
        assert torch.equal(answer(model, 3, turbo_mode="none"), reference)
    finally:
        patch.remove()


@pytest.mark.parametrize(
    ("mode", "method", "rank"), [("llm", "prune", "last"), ("both", "merge", "text")]
)
def test_llm_batch_rows_equal_single_rows(model, mode: str, method: str, rank: str) -> None:
    before, after = prompts(3)
    px = pixels(3)
    patch = ta.apply(model, r=3)
    patch.llm = LLMReduction(layer=1, keep=0.3, method=method, rank=rank)
    patch.modes = mode
    gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, return_dict_in_generate=True)
    try:
        with torch.no_grad():
            out = model.generate(px, before, after, **gen)
            image = model.encode_image(px)
            alone = [
                model.generate(px[b : b + 1], before[b : b + 1], after[b : b + 1], **gen)
                for b in range(3)
            ]
    finally:
        patch.remove()
    assert out.sequences.shape == (3, NEW)
    for b in range(3):
        assert torch.equal(out.sequences[b], alone[b].sequences[0]), b
    # layer 0 caches the whole (padded) prompt, layer 1 the kept tokens of the longest row
    tokens = image.shape[1]
    assert tokens == (16 if mode == "llm" else 12)  # 65 - 5 * 3 -> 49 patches, rule: 48
    width = tokens + max(len(h) + len(t) for h, t in zip(before, after, strict=True))
    kept = max(len(h) + len(t) for h, t in zip(before, after, strict=True)) + -(-3 * tokens // 10)
    cache = find_cache(out)
    assert cache.get_seq_length(0) == width + NEW - 1
    assert cache.get_seq_length(1) == kept + NEW - 1


def test_llm_prune_at_layer0_matches_unpatched_on_kept_tokens(model) -> None:
    before, after = prompts(1)
    px = pixels(1)
    keep = 5
    decoder = model.llama_model.get_base_model().model
    with torch.no_grad():
        embeds, _ = model.embed_prompts(px, before, after)
        image = prompt_layout(before, after, PATCHES // 4)[1][0]
        kept = ranked_kept(decoder, embeds, image, keep)
    patch = ta.apply(model, r=0)
    try:
        patch.llm = LLMReduction(layer=0, keep=keep / (PATCHES // 4))
        patch.modes = "llm"
        with torch.no_grad():
            out = model.generate(
                px, before, after, max_new_tokens=NEW, min_new_tokens=NEW,
                return_dict_in_generate=True,
            )  # fmt: skip
    finally:
        patch.remove()
    assert kept.numel() == len(before[0]) + keep + len(after[0])
    assert torch.equal(cache_state(find_cache(out)).kept[0], kept)
    eos = model.llama_model.generation_config.eos_token_id  # min_new_tokens bans it
    embed = model.llama_model.get_input_embeddings()
    tokens = greedy_on_kept(model.llama_model, embed, embeds, kept, NEW, banned=eos)
    assert out.sequences[0].tolist() == tokens
    # the oracle depends on which image tokens are kept: other ones answer differently
    dropped = image.nonzero().squeeze(-1)[~torch.isin(image.nonzero().squeeze(-1), kept)]
    other = torch.cat([(~image).nonzero().squeeze(-1), dropped[:keep]]).sort().values
    assert greedy_on_kept(model.llama_model, embed, embeds, other, NEW, banned=eos) != tokens


def test_llm_settings_and_errors(model) -> None:
    patch = ta.apply(model)
    try:
        assert isinstance(patch, VisionLanguagePatch) and patch.modes == frozenset({"tower"})
        assert patch.num_text_layers == 2
        with pytest.raises(ValueError, match="llm layer must be in \\[0, 1\\], got 2"):
            answer(model, 1, turbo_mode="llm")  # the default K = 2 needs a deeper LLaMA
        with pytest.raises(ValueError, match="llm layer must be in \\[0, 1\\]"):
            patch.llm = LLMReduction(layer=2)
        patch.llm = LLMReduction(layer=1, keep=0.5)
        with pytest.raises(ValueError, match="turbo mode must be"):
            answer(model, 1, turbo_mode="fast")
        with pytest.raises(ValueError, match="num_beams=1"):
            answer(model, 1, turbo_mode="llm", num_beams=2)
        patch.modes = "llm"
        embeds, mask = model.embed_prompts(pixels(1), *prompts(1))
        with pytest.warns(RuntimeWarning, match="nothing was reduced"), torch.no_grad():
            model.llama_model(inputs_embeds=embeds, attention_mask=mask)
    finally:
        patch.remove()


# ------------------------------------------------------------------- loader
def _old_style(key: str) -> str:
    return key.replace(".lora_A.default.weight", ".lora_A.weight").replace(
        ".lora_B.default.weight", ".lora_B.weight"
    )


@pytest.mark.parametrize("style", ["old", "new"])
def test_loader_round_trips_the_official_layout(tmp_path, style: str) -> None:
    cfg = config(depth=2)
    torch.manual_seed(5)
    base = LlamaForCausalLM(cfg.llama)
    base.save_pretrained(tmp_path / "llama")
    reference = MiniGPTv2(cfg, llama=LlamaForCausalLM.from_pretrained(tmp_path / "llama"))
    randomize(reference, seed=7, only=("lora_", "llama_proj", "q_bias", "v_bias"))
    own = reference.state_dict()
    ckpt = {k: v for k, v in own.items() if k.startswith("llama_proj.") or ".lora_" in k}
    assert any(".lora_A.default.weight" in k for k in ckpt)
    if style == "old":
        ckpt = {_old_style(k): v for k, v in ckpt.items()}
        assert all(official_lora_key(_old_style(k)) == k for k in own if ".lora_" in k)
    torch.save({"model": ckpt}, tmp_path / "minigptv2.pth")
    eva = {k: v for k, v in reference.visual_encoder.state_dict().items()}
    eva.update({f"ln_vision.{k}": v for k, v in reference.ln_vision.state_dict().items()})
    torch.save(eva, tmp_path / "eva_vit_g.pth")

    loaded, report = load_minigptv2(
        tmp_path / "minigptv2.pth", tmp_path / "eva_vit_g.pth", tmp_path / "llama", cfg
    )
    assert report.ok, report
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        px = pixels(1)
        assert torch.equal(loaded.encode_image(px), reference.eval().encode_image(px))


def test_loader_names_missing_and_unexpected_keys(tmp_path) -> None:
    cfg = config(depth=1)
    torch.manual_seed(5)
    LlamaForCausalLM(cfg.llama).save_pretrained(tmp_path / "llama")
    reference = MiniGPTv2(cfg)
    own = reference.state_dict()
    ckpt = {k: v for k, v in own.items() if k.startswith("llama_proj.") or ".lora_" in k}
    dropped = next(k for k in ckpt if ".lora_B." in k)
    del ckpt[dropped]
    ckpt["llama_model.extra.weight"] = torch.zeros(1)
    torch.save({"model": ckpt}, tmp_path / "ckpt.pth")
    eva = reference.visual_encoder.state_dict()
    eva["blocks.39.attn.qkv.weight"] = torch.zeros(1)  # the official file's unused 40th block
    torch.save(eva, tmp_path / "eva.pth")
    _, report = load_minigptv2(tmp_path / "ckpt.pth", tmp_path / "eva.pth", tmp_path / "llama", cfg)
    assert report.missing["checkpoint"] == [dropped]
    assert report.unexpected["checkpoint"] == ["llama_model.extra.weight"]
    assert report.unexpected["eva"] == ["blocks.39.attn.qkv.weight"]
    assert report.missing["ln_vision"] == ["ln_vision.weight", "ln_vision.bias"]
    assert not report.ok
