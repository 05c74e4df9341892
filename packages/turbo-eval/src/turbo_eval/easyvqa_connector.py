"""Connector-stage reduction on ``easyvqa-real``: reduce the tower's patch tokens before the fusion.

The DINOv2 tower runs unpatched once per image; its 256 patch tokens (224 px) are then cut to
a budget by a connector method of :data:`turbo_core.CONNECTOR_METHODS`, and the fusion sees
the CLS token plus the reduced patches (sizes: 1 for CLS, the method's sizes for the rest).

Per image we keep, from one unpatched pass: the output tokens, the last layer's keys of the
patches (``k_proj`` of the last block's normed input, all heads concatenated) and the last
layer's CLS attention over the patches (mean over heads), the guide for Turbo and VisionZip.
The pass is cached in blocks of images by the model key.

Text-guided Turbo (:data:`TEXT_GUIDED_CONFIGS`) ranks each *question's* copy of its image's
tokens with the guide the question gives: the fusion's first cross-attention from the
question tokens to the unreduced image tokens (mean over heads and real question tokens),
as BLIP's cross-modal guidance does; the cut therefore differs per question.

CDPruner is refused here: it ranks image tokens by their similarity to the instruction, which
needs the text in the space of the image tokens (as a VLM's projector puts them); the MiniLM
question states and the DINOv2 tokens are two unrelated 384-wide spaces, so a cosine between
them means nothing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from turbo_core.connector import ConnectorInputs, ReducedTokens
from turbo_core.selection import DivPrune, TurboSelection, VisionZip

from .easyvqa_real import EasyVQARealModel, _cache_root, _questions, _read_images

__all__ = [
    "CONNECTOR_CONFIGS",
    "REFUSED",
    "TEXT_GUIDED_CONFIGS",
    "ConnectorPass",
    "connector_tokens",
    "question_guides",
    "text_guided_scores",
    "tower_pass",
]

_BLOCK = 100

#: config name -> (method, pass the CLS guide?)
CONNECTOR_CONFIGS: dict[str, tuple[Callable[[ConnectorInputs, int], ReducedTokens], bool]] = {
    "turbo (CLS guide, a=1)": (TurboSelection(alpha=1.0), True),
    "turbo redundancy-only": (TurboSelection(alpha=0.0), False),
    "visionzip": (VisionZip(), True),
    "divprune": (DivPrune(), False),
}
#: config name -> method, guided per question by the fusion's first cross-attention
TEXT_GUIDED_CONFIGS: dict[str, Callable[[ConnectorInputs, int], ReducedTokens]] = {
    "turbo (text guide, a=1)": TurboSelection(alpha=1.0),
    "turbo (text guide, a=8)": TurboSelection(alpha=8.0),
}
#: methods that cannot run on this model, and why
REFUSED = {
    "cdpruner": "needs instruction embeddings in the image tokens' space; MiniLM question "
    "states and DINOv2 tokens live in unrelated spaces (no projector joins them)",
}


class ConnectorPass(dict):
    """``tokens`` (I, 1+N, 384) float16, ``keys`` (I, N, 384) float16, ``guide`` (I, N)."""


def _last_layer_probe(model: EasyVQARealModel) -> tuple[Any, dict[str, torch.Tensor]]:
    attention = model.module.encoder.layer[-1].attention
    seen: dict[str, torch.Tensor] = {}

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        b, n, _ = hidden.shape
        shape = (b, n, -1, module.head_dim)
        q = module.q_proj(hidden).view(shape).transpose(1, 2)
        k = module.k_proj(hidden).view(shape).transpose(1, 2)
        cls = (q[:, :, :1] @ k.transpose(-1, -2) * module.scaling).softmax(-1)  # (b, h, 1, n)
        seen["guide"] = cls[:, :, 0, 1:].mean(1)
        seen["keys"] = k.transpose(1, 2).reshape(b, n, -1)[:, 1:]

    return attention.register_forward_pre_hook(hook, with_kwargs=True), seen


def tower_pass(
    model: EasyVQARealModel,
    count: int,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> ConnectorPass:
    """The unpatched tower's tokens, last-layer patch keys and CLS attention of the first
    ``count`` test images (cached in blocks of 100 images)."""
    from safetensors.torch import load_file, save_file

    if model.handle is not None:
        raise ValueError("tower_pass needs the unpatched tower; call model.set_method(None)")
    paths = _questions("test")[3]
    if not 1 <= count <= len(paths):
        raise ValueError(f"count must be in [1, {len(paths)}], got {count}")
    name = hashlib.sha256(f"{model.key}-{model.hyper.resolution}".encode()).hexdigest()[:16]
    folder = _cache_root(cache_dir) / "connector-pass"
    parts: dict[str, list[torch.Tensor]] = {"tokens": [], "keys": [], "guide": []}
    for start in range(0, count, _BLOCK):
        stop = min(start + _BLOCK, count)
        target = folder / f"{name}-{start}-{stop}.safetensors"
        if target.is_file():
            stored = load_file(target)
        else:
            stored = _pass(model, _read_images(paths[start:stop]))
            folder.mkdir(parents=True, exist_ok=True)
            save_file(stored, target)
            if progress:
                print(f"  tower pass {stop}/{count} images", flush=True)
        for key in parts:
            parts[key].append(stored[key])
    return ConnectorPass({key: torch.cat(value) for key, value in parts.items()})


def _pass(model: EasyVQARealModel, images: Sequence[Any], batch: int = 16) -> dict:
    handle, seen = _last_layer_probe(model)
    tokens, keys, guide = [], [], []
    try:
        for i in range(0, len(images), batch):
            out, _ = model.tower_tokens(images[i : i + batch], batch=batch)
            tokens.append(out)
            keys.append(seen["keys"].to(torch.float16))
            guide.append(seen["guide"].float())
    finally:
        handle.remove()
    return {
        "tokens": torch.cat(tokens).contiguous(),
        "keys": torch.cat(keys).contiguous(),
        "guide": torch.cat(guide).contiguous(),
    }


def connector_tokens(
    data: ConnectorPass, config: str, budget: int, chunk: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS + the patches reduced to ``budget`` by ``config``: tokens ``(I, 1+K, 384)`` and
    sizes ``(I, 1+K)`` (CLS counts 1)."""
    if config in REFUSED:
        raise ValueError(f"connector method {config!r} is refused here: {REFUSED[config]}")
    if config not in CONNECTOR_CONFIGS:
        raise ValueError(f"config must be one of {sorted(CONNECTOR_CONFIGS)}, got {config!r}")
    method, guided = CONNECTOR_CONFIGS[config]
    tokens, sizes = [], []
    for i in range(0, data["tokens"].shape[0], chunk):
        block = data["tokens"][i : i + chunk].float()
        inputs = ConnectorInputs(
            features=block[:, 1:],
            keys=data["keys"][i : i + chunk].float(),
            guide=data["guide"][i : i + chunk] if guided else None,
        )
        out = method(inputs, budget)
        tokens.append(torch.cat([block[:, :1], out.tokens], 1))
        sizes.append(torch.cat([torch.ones(block.shape[0], 1), out.sizes.float()], 1))
    return torch.cat(tokens), torch.cat(sizes)


def question_guides(
    model: EasyVQARealModel,
    data: ConnectorPass,
    image_index: torch.Tensor,
    questions: Sequence[str],
) -> torch.Tensor:
    """``(Q, N)``: each question's attention to its image's patch tokens in the fusion's first
    cross-attention (unreduced image, mean over heads and the question's real tokens)."""
    if model.fusion is None:
        raise ValueError("question_guides needs a built model (model.fusion is None)")
    text, mask = model.text_for(list(questions))
    used, local = torch.unique(image_index, return_inverse=True)
    with torch.inference_mode():
        weights = model.fusion.first_cross_attention(
            data["tokens"][used].float(), local, text, mask
        )  # (Q, heads, L, 1 + N)
    per_token = weights.mean(dim=1)
    real = mask.to(per_token.dtype).unsqueeze(-1)
    guide = (per_token * real).sum(dim=1) / real.sum(dim=1).clamp_min(1.0)
    return guide[:, 1:]


def text_guided_scores(
    model: EasyVQARealModel,
    data: ConnectorPass,
    config: str,
    budget: int,
    keep: Sequence[int],
    chunk: int = 256,
) -> dict[bool, Any]:
    """Per-question VQA accuracy of the test questions ``keep`` when each question's image
    tokens are cut to ``budget`` by ``config`` under that question's own guide; keyed by
    whether ``log(size)`` enters the fusion's cross-attention."""
    import numpy as np

    from .easyvqa_real import ANSWERS
    from .vl_metrics import vqa_accuracy

    if config not in TEXT_GUIDED_CONFIGS:
        raise ValueError(f"config must be one of {sorted(TEXT_GUIDED_CONFIGS)}, got {config!r}")
    if model.fusion is None:
        raise ValueError("text_guided_scores needs a built model (model.fusion is None)")
    method = TEXT_GUIDED_CONFIGS[config]
    questions, answers, image_ids, _ = _questions("test")
    keep = list(keep)
    predicted: dict[bool, list[str]] = {False: [], True: []}
    for start in range(0, len(keep), chunk):
        rows = keep[start : start + chunk]
        index = torch.tensor([image_ids[i] for i in rows])
        asked = [questions[i] for i in rows]
        guide = question_guides(model, data, index, asked)
        block = data["tokens"][index].float()
        out = method(
            ConnectorInputs(features=block[:, 1:], keys=data["keys"][index].float(), guide=guide),
            budget,
        )
        tokens = torch.cat([block[:, :1], out.tokens], 1)
        sizes = torch.cat([torch.ones(len(rows), 1), out.sizes.float()], 1)
        text, mask = model.text_for(asked)
        own = torch.arange(len(rows))
        with torch.inference_mode():
            for bias in (False, True):
                logits = model.fusion(tokens, own, text, mask, sizes if bias else None)
                predicted[bias] += [ANSWERS[i] for i in logits.argmax(-1).tolist()]
    return {
        bias: np.array(
            [vqa_accuracy([p], [(answers[i],) * 10]) for p, i in zip(said, keep, strict=True)]
        )
        for bias, said in predicted.items()
    }
