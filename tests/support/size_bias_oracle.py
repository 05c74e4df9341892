"""Oracles for ``log(size)`` in the language model after a connector merge: the unpatched
model fed the shortened prompt, the method's tokens, and an explicit additive mask that
carries ``log(size)`` on each image key (written here from the mask rules, not from the
adapters' code).

Mask rules (query q, key k of one row; ``blocks`` as transformers' ``block_sequence_ids``,
-1 for text): allowed when the key is not padding, and ``k <= q`` or q and k share a block
>= 0 (a prefix-LM's bidirectional image block), and, in a sliding-window layer,
``k > q - window``.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from support import connector_methods as cm
from support import tiny_llava
from turbo_core.connector import ConnectorInputs


def strided_sizes(tokens: Sequence[int], k: int) -> list[float]:
    """Sizes of ``test-strided``'s kept tokens, images in order (a kept token stands for
    itself and the tokens after it up to the next kept one)."""
    sizes = []
    for n in tokens:
        kept = cm.strided_index(n, min(k, n))
        sizes += [float((kept[j + 1] if j + 1 < len(kept) else n) - s) for j, s in enumerate(kept)]
    return sizes


def key_logs(ids: torch.Tensor, image: int, sizes: Sequence[float]) -> torch.Tensor:
    """``(B, L)`` float64: ``log(size)`` at each image placeholder (row-major order), else 0."""
    flat = iter(sizes)
    logs = torch.zeros(ids.shape, dtype=torch.float64)
    for b in range(ids.shape[0]):
        for i, t in enumerate(ids[b].tolist()):
            if t == image:
                logs[b, i] = math.log(next(flat))
    assert next(flat, None) is None, "more sizes than placeholders"
    return logs


def bias_mask(
    mask: torch.Tensor,
    logs: torch.Tensor,
    blocks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """The ``(B, 1, L, L)`` additive float32 mask of the rules above, ``logs`` (``(B, L0)``,
    L0 <= L: the prompt; later keys get 0) added on every allowed key."""
    batch, length = mask.shape
    neg = torch.finfo(torch.float32).min
    out = torch.full((batch, 1, length, length), neg)
    for b in range(batch):
        for q in range(length):
            for k in range(length):
                if not mask[b, k]:
                    continue
                causal = k <= q
                block = (
                    blocks is not None
                    and int(blocks[b, q]) >= 0
                    and (int(blocks[b, q]) == int(blocks[b, k]))
                )
                inside = window is None or k > q - window
                if (causal or block) and inside:
                    out[b, 0, q, k] = float(logs[b, k]) if k < logs.shape[1] else 0.0
    return out


def image_runs(types: torch.Tensor) -> torch.Tensor:
    """Gemma 3's blocks: each run of image tokens (type 1) numbered from 0 per row, -1 else."""
    blocks = torch.full(types.shape, -1)
    for b in range(types.shape[0]):
        run, previous = -1, False
        for i, t in enumerate(types[b].tolist()):
            if t == 1 and not previous:
                run += 1
            if t == 1:
                blocks[b, i] = run
            previous = t == 1
    return blocks


#: ``masks(mask, logs, types)`` -> the ``attention_mask`` argument of one oracle call
Masks = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], Any]


def causal_masks(mask: torch.Tensor, logs: torch.Tensor, types: Any) -> torch.Tensor:
    return bias_mask(mask, logs)


def paligemma_masks(mask: torch.Tensor, logs: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """PaliGemma: the prefix (type 0) is one bidirectional block."""
    return bias_mask(mask, logs, torch.where(types == 0, 0, -1))


def gemma3_masks(window: int) -> Masks:
    """Gemma 3: every image run a bidirectional block; its layers' two masks."""

    def masks(mask: torch.Tensor, logs: torch.Tensor, types: torch.Tensor) -> dict:
        blocks = image_runs(types)
        return {
            "full_attention": bias_mask(mask, logs, blocks),
            "sliding_attention": bias_mask(mask, logs, blocks, window),
        }

    return masks


def shortened_call(
    model: torch.nn.Module, feed: dict[str, Any], tokens: Sequence[int], k: int, image: int
) -> tuple[dict[str, Any], list[float]]:
    """The unpatched model's inputs for the call ``test-strided`` reduces to ``k`` tokens
    per image, built by hand, and the kept tokens' sizes.

    ``tokens`` are the images' token counts (the model's features, one entry per image in
    placeholder order); each placeholder run keeps the strided indices of its image, the
    rows are left-padded again, token types re-laid alike.
    """
    inner = model.model
    accepted = [p for p in inspect.signature(inner.get_image_features).parameters if p != "kwargs"]
    kwargs = {key: feed[key] for key in accepted if feed.get(key) is not None}
    with torch.no_grad():
        output = inner.get_image_features(**kwargs, return_dict=True)
    pooled = output.pooler_output
    features = [f.reshape(-1, f.shape[-1]) for f in pooled]
    assert [len(f) for f in features] == list(tokens)
    kept = [cm.keep_strided(ConnectorInputs(f[None]), k).tokens[0] for f in features]
    output = copy.copy(output)
    output.pooler_output = torch.cat(kept)[None] if isinstance(pooled, torch.Tensor) else kept
    keep = [set(cm.strided_index(n, min(k, n))) for n in tokens]
    types_in = feed.get("token_type_ids")
    prompts, types = [], []
    image_no, index = 0, 0
    for row in range(feed["input_ids"].shape[0]):
        valid = feed["attention_mask"][row].bool()
        ids = feed["input_ids"][row][valid].tolist()
        kinds = types_in[row][valid].tolist() if types_in is not None else [0] * len(ids)
        short, short_types = [], []
        for t, kind in zip(ids, kinds, strict=True):
            if t == image:
                if index in keep[image_no]:
                    short.append(t)
                    short_types.append(kind)
                index += 1
                if index == tokens[image_no]:
                    image_no, index = image_no + 1, 0
            else:
                short.append(t)
                short_types.append(kind)
        prompts.append(short)
        types.append(short_types)
    ids, mask = tiny_llava.left_pad(prompts)
    call = {"input_ids": ids, "attention_mask": mask, "mm_encoder_outputs": {"image": output}}
    if types_in is not None:
        token_types = torch.zeros_like(ids)
        for row, t in enumerate(types):
            token_types[row, ids.shape[1] - len(t) :] = torch.tensor(t)
        call["token_type_ids"] = token_types
    return call, strided_sizes(tokens, k)


def greedy_with_bias(
    model: torch.nn.Module,
    call: dict[str, Any],
    sizes: Sequence[float],
    image: int,
    steps: int,
    masks: Masks = causal_masks,
    new_type: int = 0,
) -> torch.Tensor:
    """Greedy decoding by full recomputation, every step with the explicit bias masks
    (``log(size)`` on the prompt's image keys only; generated tokens get type
    ``new_type``). Qwen's M-RoPE ``position_ids`` advance by one per step."""
    ids, mask = call["input_ids"], call["attention_mask"]
    logs = key_logs(ids, image, sizes)
    types = call.get("token_type_ids")
    positions = call.get("position_ids")
    out = []
    for _ in range(steps):
        feed = {**call, "input_ids": ids, "attention_mask": masks(mask, logs, types)}
        if types is not None:
            feed["token_type_ids"] = types
        if positions is not None:
            feed["position_ids"] = positions
            feed["mm_token_type_ids"] = (ids == image).long()
            feed["mm_token_type_ids"][:, logs.shape[1] :] = 0
        with torch.no_grad():
            token = model(**feed).logits[:, -1].argmax(-1)
        out.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if types is not None:
            types = torch.cat([types, torch.full_like(types[:, :1], new_type)], 1)
        if positions is not None:
            nxt = positions.amax(dim=(0, 2)) + 1
            positions = torch.cat([positions, nxt.view(1, -1, 1).expand(3, -1, 1)], 2)
    return torch.stack(out, 1)
