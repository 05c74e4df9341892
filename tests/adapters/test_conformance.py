"""Every built-in adapter through the conformance kit (turbo_adapters.testing).

An adapter joins by adding one `Case` to `CASES`: a tiny model built from a config in
code, its inputs, and q/k written from its own attention modules for the oracle.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("timm")
pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from support.docs_example import docs_family  # noqa: E402
from support.tiny_vit import (  # noqa: E402
    DEPTH,
    HEADS,
    IMAGE,
    PATCH,
    TOKENS,
    WIDTH,
    heads,
    hf_qk,
    images,
    informative,
    of_class,
    timm_qk,
    vision_config,
)

from turbo_adapters import BlockSpec, token_sizes  # noqa: E402
from turbo_adapters.families import bert, clip, hf_vit, timm_eva, timm_vit  # noqa: E402
from turbo_adapters.families import torchvision_vit as tv  # noqa: E402
from turbo_adapters.testing import Case, KitOps, parametrize, run_check  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def call(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    return model(*args)


# ------------------------------------------------------------------------ timm ViT
def build_timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
        num_classes=10, qkv_bias=True,
    )  # fmt: skip
    return informative(model)


def prune_timm(model: nn.Module, args: tuple[Any, ...]) -> None:
    """torch-pruning: one of four heads and 30% of MLP channels (its timm recipe)."""
    import torch_pruning as tp

    attentions = {blk.attn.qkv: blk.attn.num_heads for blk in model.blocks}
    pruner = tp.pruner.MetaPruner(
        model, args[0], importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.3,
        num_heads=attentions, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=0.25, ignored_layers=[model.head],
    )  # fmt: skip
    pruner.step()
    for blk in model.blocks:  # what timm's own forward needs; Turbo reads the tensors
        blk.attn.num_heads = pruner.num_heads[blk.attn.qkv]
        blk.attn.attn_dim = blk.attn.num_heads * blk.attn.head_dim
    assert model.blocks[0].attn.num_heads == 3


# --------------------------------------------------------------------------- EVA
def build_eva() -> nn.Module:
    from timm.models.eva import Eva

    torch.manual_seed(0)
    model = Eva(
        img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
        num_classes=10, qkv_bias=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4),
        init_values=0.5, swiglu_mlp=True,
    )  # fmt: skip
    return informative(model)


def eva_qk(model: nn.Module, block: nn.Module, x: torch.Tensor):
    from timm.layers import apply_rot_embed_cat

    attn = block.attn
    bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    q, k, _ = (heads(t, attn.head_dim) for t in (attn.qkv(x) + bias).chunk(3, dim=-1))
    q, k = attn.q_norm(q), attn.k_norm(k)
    rope = model.rope.get_embed()  # no merge before the first block: every patch its own row
    q = torch.cat([q[:, :, :1], apply_rot_embed_cat(q[:, :, 1:], rope)], dim=2)
    k = torch.cat([k[:, :, :1], apply_rot_embed_cat(k[:, :, 1:], rope)], dim=2)
    return q, k, attn.scale


# ------------------------------------------------------------------- torchvision
def build_torchvision() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=IMAGE, patch_size=PATCH, num_layers=DEPTH, num_heads=HEADS,
        hidden_dim=WIDTH, mlp_dim=2 * WIDTH, num_classes=10,
    )  # fmt: skip
    return informative(model)


def torchvision_qk(model: nn.Module, block: nn.Module, x: torch.Tensor):
    mha = block.self_attention
    q, k, _ = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    return heads(q, mha.head_dim), heads(k, mha.head_dim), mha.head_dim**-0.5


def prune_torchvision(model: nn.Module, args: tuple[Any, ...]) -> None:
    """torch-pruning with its MultiheadAttention rule (it keeps MHA's heads: 1.6 prunes
    embedding channels there) and 30% of MLP channels."""
    import torch_pruning as tp

    mhas = [b.self_attention for b in model.encoder.layers]
    pruner = tp.pruner.MetaPruner(
        model, args[0], importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.3,
        num_heads={m: m.num_heads for m in mhas}, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=0.25, ignored_layers=[model.heads],
    )  # fmt: skip
    pruner.step()
    assert model.encoder.layers[0].mlp[0].out_features < 2 * WIDTH


# ------------------------------------------------------------------ transformers


def build_hf(model_cls: str, config_cls: str, **kw: Any) -> Any:
    def build() -> nn.Module:
        torch.manual_seed(0)
        config = vision_config(getattr(transformers, config_cls), **kw)
        return informative(getattr(transformers, model_cls)(config))

    return build


def prune_hf(
    attention: str, head: str | None, names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
) -> Any:
    """torch-pruning on separate q/k/v Linear layers: one of four heads, 30% of MLP channels."""

    def prune(model: nn.Module, args: tuple[Any, ...]) -> None:
        import torch_pruning as tp

        attns = [m for n, m in model.named_modules() if type(m).__name__ == attention]
        num_heads = {getattr(a, name): HEADS for a in attns for name in names}
        pruner = tp.pruner.MetaPruner(
            model, args if len(args) > 1 else args[0],
            importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.3,
            num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
            head_pruning_ratio=0.25,
            ignored_layers=[] if head is None else [model.get_submodule(head)],
        )  # fmt: skip
        pruner.step()
        first = getattr(attns[0], names[0])
        assert first.out_features == 3 * (WIDTH // HEADS), first  # one head gone

    return prune


def build_docs_family() -> nn.Module:
    docs_family()  # registers hf-vit-msn, the family docs/custom-models.md declares
    return build_hf("ViTMSNForImageClassification", "ViTMSNConfig", num_labels=10)()


def clip_pooled(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    return model(*args).pooler_output


def build_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH, max_position_embeddings=32,
    )  # fmt: skip
    return informative(transformers.BertModel(config))


def bert_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 50, (batch, 12), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones(batch, 12, dtype=torch.long)
    if batch > 2:
        mask[2, 8:] = 0  # one padded row (rows 0 and 1 stay unpadded for the oracle)
    return ids, mask


def bert_pooled(model: nn.Module, args: tuple[Any, ...]) -> torch.Tensor:
    hidden = model(*args).last_hidden_state
    weight = token_sizes(hidden)
    if weight is None:
        weight = args[1].unsqueeze(-1)  # the unpatched model: mean over real tokens
    weight = weight.to(hidden.dtype)
    return (hidden * weight).sum(1) / weight.sum(1)


CASES = [
    Case(
        "timm-vit",
        build_timm_vit,
        images,
        call,
        TOKENS,
        1,
        lambda m: list(m.blocks),
        timm_vit.TIMM_BLOCK,
        timm_qk,
        prune=prune_timm,
    ),
    Case(
        "timm-eva",
        build_eva,
        images,
        call,
        TOKENS,
        1,
        lambda m: list(m.blocks),
        timm_eva.eva_block(build_eva().blocks[0].attn),
        eva_qk,
        cannot={
            "torchao_int8": "timm's fused-qkv EvaAttention calls F.linear(x, weight, bias=...) "
            "itself, which torchao 0.18's int8 weight rejects (tested with split q/k/v in "
            "test_eva.py)",
            "torch_pruning": "torch-pruning does not prune EvaAttention's separate q_bias/"
            "v_bias parameters with the qkv rows, so the unpatched pruned model cannot run",
            "cpu_offload": "the unpatched model returns NaN under accelerate's cpu_offload",
        },
    ),
    Case(
        "torchvision-vit",
        build_torchvision,
        images,
        call,
        TOKENS,
        1,
        lambda m: list(m.encoder.layers),
        tv.TORCHVISION_BLOCK,
        torchvision_qk,
        prune=prune_torchvision,
        cannot={
            "cpu_offload": "nn.MultiheadAttention fails under accelerate's cpu_offload "
            "unpatched (its out_proj weight is read outside out_proj's forward)"
        },
    ),
    Case(
        "hf-vit",
        build_hf("ViTForImageClassification", "ViTConfig", num_labels=10),
        images,
        lambda m, a: m(*a).logits,
        TOKENS,
        1,
        of_class("ViTLayer"),
        hf_vit.HF_VIT_LAYER,
        hf_qk("attention"),
        prune=prune_hf("ViTAttention", "classifier"),
    ),
    Case(
        "hf-deit-teacher",
        build_hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=10),
        images,
        lambda m, a: m(*a).logits,
        TOKENS + 1,
        2,
        of_class("DeiTLayer"),
        hf_vit.HF_VIT_LAYER,
        hf_qk("attention"),
        prune=prune_hf("DeiTAttention", None),
    ),
    Case(
        "hf-dinov2",
        build_hf("Dinov2ForImageClassification", "Dinov2Config", num_labels=10),
        images,
        lambda m, a: m(*a).logits,
        TOKENS,
        1,
        of_class("Dinov2Layer"),
        hf_vit.DINOV2_LAYER,
        hf_qk("attention"),
        cannot={
            "torch_pruning": "torch-pruning cannot trace the classifier's [CLS, mean] "
            "concatenation: the unpatched pruned model fails"
        },
    ),
    Case(
        "hf-clip",
        build_hf("CLIPVisionModel", "CLIPVisionConfig"),
        images,
        clip_pooled,
        TOKENS,
        1,
        of_class("CLIPEncoderLayer"),
        clip.CLIP_LAYER,
        hf_qk("self_attn", scale="scale"),
        prune=prune_hf("CLIPAttention", None),
    ),
    Case(
        "hf-bert",
        build_bert,
        bert_inputs,
        bert_pooled,
        12,
        1,
        of_class("BertLayer"),
        bert.BERT_LAYER,
        hf_qk("attention.self", q="query", k="key"),
        r=2,
        prune=prune_hf("BertSelfAttention", "pooler", ("query", "key", "value")),
    ),
    # the tower family docs/custom-models.md declares in ~30 lines: one case here
    Case(
        "hf-vit-msn-docs",
        build_docs_family,
        images,
        lambda m, a: m(*a).logits,
        TOKENS,
        1,
        of_class("ViTMSNLayer"),
        docs_family().VIT_MSN.block,
        hf_qk("attention"),
        prune=prune_hf("ViTMSNAttention", "classifier"),
    ),
]


# ------------------------------------------------------------------ Stable Diffusion
SD_GRID = (16, 12)  # latent height x width: the tokens of the full-resolution blocks
SD_TEXT = 32


class StableDiffusionOps(KitOps):
    """The kit's r on a diffusion UNet: merge ratio ``r / 10`` on attn1, attn2 and ff.

    Merge-and-restore gives the full length back after every component, so the counts
    the kit compares are the tokens inside each full-resolution block (after the merge,
    ``N - int(N * ratio)``, capped at what the 2x2 windows allow). Destinations are the
    windows' top-left tokens (``use_rand=False``): random ones are drawn per denoising
    step, and the kit's repeated calls would be successive steps.
    """

    def __init__(self, names: list[str], tokens: int) -> None:
        self.names = names
        self.max_r = tokens - tokens // 4  # one destination per 2x2 window

    @staticmethod
    def settings(r: Any) -> dict[str, float]:
        return {f"ratio_{c}": r / 10 for c in ("attn1", "attn2", "ff")}

    def apply(self, model: nn.Module, r: Any, **config: Any) -> Any:
        import turbo_adapters as ta

        return ta.apply(model, use_rand=False, **self.settings(r), **config)

    def set_r(self, patch: Any, r: Any) -> None:
        patch.configure(**self.settings(r))

    def counts(self, patch: Any) -> list[int]:
        (stats,) = patch.last_stats.values()
        merged = {name: r.get("attn1", 0) for name, _, r in stats.tokens}
        assert not stats.passed, stats.passed
        return [SD_GRID[0] * SD_GRID[1] - merged.get(name, 0) for name in self.names]

    def expected(self, case: Case, schedule: list[int]) -> list[int]:
        return [case.tokens - min(int(case.tokens * (r / 10)), self.max_r) for r in schedule]

    def source(self, patch: Any) -> None:
        return None  # the plans live inside one call; the outputs are compared


def build_sd_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    from turbo_eval.diffusion import tiny_unet_config

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=SD_TEXT)).eval()


def build_sd_controlnet() -> nn.Module:
    from turbo_eval.diffusion import tiny_controlnet

    return tiny_controlnet(build_sd_unet())


def sd_inputs(batch: int, controlnet: bool = False) -> tuple[torch.Tensor, ...]:
    from turbo_eval.diffusion import structured_latents

    generator = torch.Generator().manual_seed(batch)
    latent = structured_latents(batch, *SD_GRID, seed=batch)
    text = torch.randn(batch, 7, SD_TEXT, generator=generator)
    timestep = torch.full((batch,), 10)  # one per sample: the kit slices every input
    if not controlnet:
        return latent, timestep, text
    cond = torch.rand(batch, 3, 2 * SD_GRID[0], 2 * SD_GRID[1], generator=generator)
    return latent, timestep, text, cond


def sd_full_resolution_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks on the latent grid itself (``max_downsample=1``)."""
    levels = [model.down_blocks[0]] + ([model.up_blocks[-1]] if hasattr(model, "up_blocks") else [])
    return [b for level in levels for t in level.attentions for b in t.transformer_blocks]


def sd_qk(model: nn.Module, block: nn.Module, x: torch.Tensor):
    attn = block.attn1
    dim = attn.to_q.out_features // attn.heads
    return heads(attn.to_q(x), dim), heads(attn.to_k(x), dim), attn.scale


def prune_sd(model: nn.Module, args: tuple[Any, ...]) -> None:
    """torch-pruning inside the transformer blocks (one of four heads, 30% of GEGLU
    channels); diffusers' resnets and resamplers assert their channel counts, so every
    layer outside the blocks is left alone."""
    import torch_pruning as tp

    blocks = [m for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"]
    inside = {id(m) for block in blocks for m in block.modules()}
    attentions = [a for block in blocks for a in (block.attn1, block.attn2)]
    outside = [
        m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in inside
    ]
    pruner = tp.pruner.MetaPruner(
        model, args, importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.3,
        num_heads={p: a.heads for a in attentions for p in (a.to_q, a.to_k, a.to_v)},
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.25,
        ignored_layers=outside,
    )  # fmt: skip
    pruner.step()
    for attention in attentions:  # diffusers' processors read heads from the module
        attention.heads = pruner.num_heads[attention.to_q]
    assert blocks[0].attn1.heads == 6 and blocks[0].ff.net[2].in_features < 128


SD_CANNOT = {
    "counts_follow_schedule": "Stable Diffusion merges one ratio per component in every "
    "merging block (tomesd's interface): per-block r lists, ToMe's (r, inflection) schedule "
    "and a Target count do not exist there; the merged counts inside the blocks follow the "
    "ratio in r0_equals_unpatched, accelerate_hooks, threads and torch_pruning",
    "block_matches_float64_oracle": "the kit's oracle is bipartite matching ranked by a CLS "
    "row, merging before the MLP; Stable Diffusion matches in 2-D windows ranked by the "
    "text's cross-attention and restores after each component. Its float64 oracles are "
    "tomesd 0.1.3 (equal to 1e-12) and an explicit loop for the text map, in "
    "test_stable_diffusion.py",
    "roles_survive_settings": "Stable Diffusion ranks with 2-D window matching "
    "(turbo_core.score_windows), so the scorer and matcher roles do not apply: configure() "
    "refuses them (test_stable_diffusion.py)",
    "bypass_is_reported": "merge and restore are torch module hooks, which torch runs "
    "whatever forward a block has: replacing a block's forward bypasses nothing here",
}

SD_CASES = (
    [
        Case(
            "diffusers-sd-unet",
            build_sd_unet,
            sd_inputs,
            lambda m, a: m(*a).sample,
            SD_GRID[0] * SD_GRID[1],
            0,
            sd_full_resolution_blocks,
            BlockSpec(attn="attn1", mlp="ff", norm1="norm1", norm2="norm3"),
            sd_qk,
            prune=prune_sd,
            cannot=SD_CANNOT,
            ops=StableDiffusionOps(
                [
                    "down_blocks.0.attentions.0.transformer_blocks.0",
                    "up_blocks.1.attentions.0.transformer_blocks.0",
                    "up_blocks.1.attentions.1.transformer_blocks.0",
                ],
                SD_GRID[0] * SD_GRID[1],
            ),
        ),
        Case(
            "diffusers-sd-controlnet",
            build_sd_controlnet,
            lambda batch: sd_inputs(batch, controlnet=True),
            lambda m, a: m(*a, return_dict=False)[1],  # the mid-block residual
            SD_GRID[0] * SD_GRID[1],
            0,
            sd_full_resolution_blocks,
            BlockSpec(attn="attn1", mlp="ff", norm1="norm1", norm2="norm3"),
            sd_qk,
            prune=prune_sd,
            cannot=SD_CANNOT,
            ops=StableDiffusionOps(
                ["down_blocks.0.attentions.0.transformer_blocks.0"], SD_GRID[0] * SD_GRID[1]
            ),
        ),
    ]
    if importlib.util.find_spec("diffusers") is not None
    else []
)


@parametrize(CASES + SD_CASES)
def test_conformance(case: Case, check: str) -> None:
    run_check(case, check)


def test_kit_runs_on_the_dtype_asked_for() -> None:
    """The kit moves model and inputs to the dtype (and device) it is given; a dtype
    that is not floating is refused by name."""
    case = CASES[0]
    seen: list[torch.dtype] = []

    def output(model, args):
        seen.append(next(model.parameters()).dtype)
        assert all(a.dtype == torch.float64 for a in args if a.is_floating_point())
        return case.output(model, args)

    run_check(dataclasses.replace(case, output=output), "r0_equals_unpatched", dtype="float64")
    assert seen and set(seen) == {torch.float64}
    with pytest.raises(ValueError, match="dtype must name a floating torch dtype"):
        run_check(case, "r0_equals_unpatched", dtype="int8")
    with pytest.raises(ValueError, match="check must be one of"):
        run_check(case, "no_such_check")
