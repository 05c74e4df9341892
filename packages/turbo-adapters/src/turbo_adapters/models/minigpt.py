"""MiniGPT-v2 assembled from maintained parts, with a loader for the official files.

Structure (from the public MiniGPT-4 repository): EVA ViT-g/14 at 448 px (timm ``Eva``:
1 CLS + 1024 patches, width 1408, 39 blocks, fused ``qkv`` without bias plus ``q_bias``/
``v_bias``, no final norm), ``ln_vision`` (LayerNorm), CLS dropped, every 4 consecutive
tokens concatenated (1024 -> 256 tokens of width 5632), ``llama_proj`` Linear(5632, 4096)
into LLaMA-2-7B-chat (transformers ``LlamaForCausalLM``) with LoRA (peft; r 64,
alpha 16, on ``q_proj`` and ``v_proj``). Prompt::

    <s>[INST] <Img><ImageHere></Img> [vqa] {question} [/INST]

With Turbo merging in the tower the number of patch tokens reaching the concatenation
must stay a multiple of 4 (:mod:`turbo_adapters.families.minigpt` sees to it). A patched
model also takes ``turbo_mode="tower" | "llm" | "both" | "none"`` in ``generate``,
``chat``, ``embed_prompts`` and ``encode_image``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "PROMPT",
    "MiniGPTv2",
    "MiniGPTv2Config",
    "load_minigptv2",
    "official_lora_key",
    "prompt_layout",
]

PROMPT = "[INST] <Img><ImageHere></Img> {task} {question} [/INST]"
IMAGE_HERE = "<ImageHere>"


@dataclasses.dataclass
class MiniGPTv2Config:
    """Shapes of a MiniGPT-v2 (defaults: the official 7B model).

    ``llama`` is a ``transformers.LlamaConfig`` (None: LLaMA-2-7B's shapes); a loader
    replaces it with the folder's own config.
    """

    image_size: int = 448
    patch_size: int = 14
    vision_width: int = 1408
    vision_depth: int = 39
    vision_heads: int = 16
    vision_mlp_ratio: float = 6144 / 1408
    concat: int = 4
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    llama: Any = None


def _eva(config: MiniGPTv2Config) -> nn.Module:
    from timm.models.eva import Eva

    return Eva(
        img_size=config.image_size, patch_size=config.patch_size, num_classes=0,
        global_pool="", embed_dim=config.vision_width, depth=config.vision_depth,
        num_heads=config.vision_heads, mlp_ratio=config.vision_mlp_ratio, qkv_bias=True,
        qkv_fused=True, use_post_transformer_norm=False, use_fc_norm=False,
    )  # fmt: skip


def _llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, vocab_size=32000, max_position_embeddings=4096,
    )  # fmt: skip


def prompt_layout(
    before: Sequence[Sequence[int]],
    after: Sequence[Sequence[int]],
    image_tokens: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where :meth:`MiniGPTv2.embed_prompts` puts each row's tokens.

    Rows are ``before + image_tokens + after``, left padded to the longest.

    Returns:
        ``(B, W)`` int64 attention mask (1 at real tokens) and ``(B, W)`` bool image mask.
    """
    lengths = [len(h) + image_tokens + len(t) for h, t in zip(before, after, strict=True)]
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
    image = torch.zeros(len(lengths), width, dtype=torch.bool, device=device)
    for b, (head, length) in enumerate(zip(before, lengths, strict=True)):
        start = width - length
        mask[b, start:] = 1
        image[b, start + len(head) : start + len(head) + image_tokens] = True
    return mask, image


class MiniGPTv2(nn.Module):
    """EVA ViT-g tower, LayerNorm, 4-token concatenation, projection, LLaMA-2 with LoRA.

    Args:
        config: the shapes.
        llama: an existing ``LlamaForCausalLM`` (the loader's); None builds one from
            ``config.llama`` with random weights.
    """

    def __init__(
        self, config: MiniGPTv2Config | None = None, llama: nn.Module | None = None
    ) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        self.config = config = config or MiniGPTv2Config()
        self.visual_encoder = _eva(config)
        self.ln_vision = nn.LayerNorm(config.vision_width)
        if llama is None:
            llama = LlamaForCausalLM(config.llama or _llama_config())
        hidden = llama.config.hidden_size
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets), bias="none", task_type="CAUSAL_LM",
        )  # fmt: skip
        self.llama_model = get_peft_model(llama, lora)
        self.llama_proj = nn.Linear(config.vision_width * config.concat, hidden)

    # ---------------------------------------------------------------- image
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, tokens / 4, hidden)`` language-model embeddings."""
        x = self.ln_vision(self.visual_encoder.forward_features(pixels))
        x = x[:, 1:]  # CLS dropped
        batch, tokens, width = x.shape
        group = self.config.concat
        if tokens % group:
            raise ValueError(
                f"{tokens} patch tokens reach the {group}-token concatenation; it needs a "
                f"multiple of {group} (with Turbo: the minigpt adapter keeps it so)"
            )
        return self.llama_proj(x.reshape(batch, tokens // group, width * group))  # type: ignore[no-any-return]

    # --------------------------------------------------------------- prompt
    def embed_prompts(
        self,
        pixels: torch.Tensor,
        before: Sequence[Sequence[int]],
        after: Sequence[Sequence[int]],
        pad_token_id: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``inputs_embeds`` and mask for ``before + image + after`` per row
        (laid out by :func:`prompt_layout`)."""
        image = self.encode_image(pixels)
        embed = self.llama_model.get_input_embeddings()
        mask, _ = prompt_layout(before, after, image.shape[1], device=image.device)
        pad = embed(torch.tensor([pad_token_id], device=image.device))[0]
        embeds = pad.expand(*mask.shape, -1).clone()
        for b, (head, tail) in enumerate(zip(before, after, strict=True)):
            ids = [
                torch.tensor(list(t), dtype=torch.long, device=image.device) for t in (head, tail)
            ]
            row = torch.cat([embed(ids[0]), image[b].to(embed.weight.dtype), embed(ids[1])])
            embeds[b, mask.shape[1] - row.shape[0] :] = row
        return embeds, mask

    def generate(
        self,
        pixels: torch.Tensor,
        before: Sequence[Sequence[int]],
        after: Sequence[Sequence[int]],
        pad_token_id: int = 0,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Greedy (by default) answers: the new token ids only, ``(B, T)``."""
        embeds, mask = self.embed_prompts(pixels, before, after, pad_token_id)
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", pad_token_id)
        return self.llama_model.generate(
            inputs_embeds=embeds, attention_mask=mask, **generate_kwargs
        )  # type: ignore[no-any-return]

    def chat(
        self,
        tokenizer: Any,
        pixels: torch.Tensor,
        questions: Sequence[str],
        task: str = "[vqa]",
        **generate_kwargs: Any,
    ) -> list[str]:
        """VQA/chat with the MiniGPT-v2 template; ``tokenizer`` is LLaMA-2's (adds ``<s>``)."""
        texts = [PROMPT.format(task=task, question=q) for q in questions]
        parts = [t.split(IMAGE_HERE) for t in texts]
        before = [tokenizer(p[0], add_special_tokens=True).input_ids for p in parts]
        after = [tokenizer(p[1], add_special_tokens=False).input_ids for p in parts]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out = self.generate(pixels, before, after, pad_token_id=pad, **generate_kwargs)
        return [s.strip() for s in tokenizer.batch_decode(out, skip_special_tokens=True)]


# ------------------------------------------------------------------ loading
def official_lora_key(key: str) -> str:
    """Older peft names (``lora_A.weight``) -> current ones (``lora_A.default.weight``).

    Without the mapping peft's loader skips them silently and LoRA stays at init.
    """
    for part in ("lora_A", "lora_B"):
        key = key.replace(f".{part}.weight", f".{part}.default.weight")
    return key


@dataclasses.dataclass
class LoadReport:
    """Keys that did not line up, by file (empty lists: everything loaded)."""

    missing: dict[str, list[str]]
    unexpected: dict[str, list[str]]

    @property
    def ok(self) -> bool:
        return not any(self.missing.values()) and not any(self.unexpected.values())


def _state(path: str | Path) -> dict[str, torch.Tensor]:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and "model" in loaded and isinstance(loaded["model"], Mapping):
        loaded = loaded["model"]
    return dict(loaded)


def load_minigptv2(
    checkpoint: str | Path,
    eva_weights: str | Path,
    llama_dir: str | Path,
    config: MiniGPTv2Config | None = None,
    dtype: torch.dtype = torch.float32,
    llama_loader: Callable[..., nn.Module] | None = None,
) -> tuple[MiniGPTv2, LoadReport]:
    """MiniGPT-v2 from local official files.

    Args:
        checkpoint: the MiniGPT-v2 ``.pth`` (``{"model": ...}``: ``llama_proj`` and the
            LoRA weights under ``llama_model.base_model.model...``, old or new peft names).
        eva_weights: EVA ViT-g weights (LAVIS names, optionally ``visual_encoder.``-prefixed;
            ``ln_vision.*`` may sit in either file).
        llama_dir: a LLaMA-2 folder for ``LlamaForCausalLM.from_pretrained``.

    Returns:
        The model (eval mode) and a :class:`LoadReport` naming missing and unexpected keys.
    """
    if llama_loader is None:
        from transformers import LlamaForCausalLM

        llama_loader = LlamaForCausalLM.from_pretrained
    llama = llama_loader(str(llama_dir), dtype=dtype)
    model = MiniGPTv2(config, llama=llama).to(dtype)
    missing: dict[str, list[str]] = {}
    unexpected: dict[str, list[str]] = {}

    eva = {k.removeprefix("visual_encoder."): v for k, v in _state(eva_weights).items()}
    ln = {k: eva.pop(k) for k in list(eva) if k.startswith("ln_vision.")}
    result = model.visual_encoder.load_state_dict(eva, strict=False)
    missing["eva"] = list(result.missing_keys)
    unexpected["eva"] = list(result.unexpected_keys)

    ckpt = {official_lora_key(k): v for k, v in _state(checkpoint).items()}
    ln.update({k: ckpt.pop(k) for k in list(ckpt) if k.startswith("ln_vision.")})
    own = model.state_dict()
    wanted = [k for k in own if k.startswith("llama_proj.") or ".lora_" in k]
    unexpected["checkpoint"] = [k for k in ckpt if k not in own]
    missing["checkpoint"] = [k for k in wanted if k not in ckpt]
    ln_keys = [k for k in own if k.startswith("ln_vision.")]
    missing["ln_vision"] = [k for k in ln_keys if k not in ln]
    loaded = {k: v for k, v in {**ckpt, **ln}.items() if k in own}
    model.load_state_dict(loaded, strict=False)
    return model.eval(), LoadReport(missing, unexpected)
