"""Informativity per block of an unpatched model (the paper's section 3.2, Figure 3).

For every block this measures, on real images:

- token redundancy: mean over patch tokens of the best cosine similarity to another patch
  token, on the block's output hidden states (:func:`turbo_core.token_redundancy`);
- attention concentration and entropy of the CLS token: the block's post-softmax CLS
  attention row, averaged over heads (Turbo's semantic value A), restricted to the patch
  tokens and renormalised, then :func:`turbo_core.attention_concentration` (share held by
  the top 10% patches) and :func:`turbo_core.attention_entropy` (normalised to [0, 1]).

The CLS row is computed from the block's own query/key projections captured by forward
hooks: ``softmax(q_cls K^T * scale)`` per head, O(N d) per block. Nothing in the model
changes, its attention stays on whatever kernel it uses, and no N x N matrix is built.
Supported: timm ``VisionTransformer``-style models (``blocks[i].attn.qkv``) and
transformers vision models whose attention has ``q_proj``/``k_proj`` (DINOv2, ViT, CLIP).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from turbo_core import attention_concentration, attention_entropy, token_redundancy

from ..models import LoadedModel, load_model

__all__ = [
    "IMAGE_SUFFIXES",
    "BlockCapture",
    "BlockProbe",
    "analyze_model",
    "find_attention_blocks",
    "informativity_rows",
    "load_images",
    "patch_grid",
    "write_informativity",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TOP_FRACTION = 0.1
_BATCH = 8
_AVERAGED = ("redundancy", "concentration", "entropy", "cls_prefix_share")


# ------------------------------------------------------------------------ images
def load_images(paths: Sequence[str | Path]) -> list[Any]:
    """Open image files, and every jpg/png inside folders (sorted), as RGB PIL images."""
    from PIL import Image

    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"images: folder {str(path)!r} has no {'/'.join(IMAGE_SUFFIXES)}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"images: {str(path)!r} is neither a file nor a folder")
    if not files:
        raise ValueError("images: give at least one image file or folder")
    images = []
    for file in files:
        with Image.open(file) as image:
            images.append(image.convert("RGB"))
    return images


# ------------------------------------------------------------------ model layout
@dataclasses.dataclass(frozen=True)
class _AttentionBlock:
    """One transformer block: the module whose output is the block's hidden states,
    and where its query and key come from."""

    block: nn.Module
    attention: nn.Module
    kind: str  # "qkv": fused projection (timm); "qk": separate q_proj / k_proj (transformers)


def _is_timm_attention(module: Any) -> bool:
    return isinstance(getattr(module, "qkv", None), nn.Linear) and hasattr(module, "head_dim")


def _is_split_attention(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in ("q_proj", "k_proj"))


def find_attention_blocks(model: nn.Module) -> list[_AttentionBlock]:
    """The model's transformer blocks in order, each with its self-attention module.

    Raises:
        TypeError: if no supported block layout is found.
    """
    blocks = getattr(model, "blocks", None)
    if (
        isinstance(blocks, nn.Sequential | nn.ModuleList)
        and len(blocks)
        and all(_is_timm_attention(getattr(b, "attn", None)) for b in blocks)
    ):
        return [_AttentionBlock(b, b.attn, "qkv") for b in blocks]
    # transformers: attention modules with q_proj/k_proj; the block is the element of the
    # ModuleList the attention sits in (the path up to its last numeric component)
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        if not _is_split_attention(module):
            continue
        parts = name.split(".")
        numeric = [i for i, part in enumerate(parts) if re.fullmatch(r"\d+", part)]
        if not numeric:
            continue
        block_name = ".".join(parts[: numeric[-1] + 1])
        found.append(_AttentionBlock(modules[block_name], module, "qk"))
    if found and len({id(b.block) for b in found}) == len(found):
        return found
    raise TypeError(
        f"cannot find the attention blocks of a {type(model).__name__}: supported are timm "
        "VisionTransformer-style models (blocks[i].attn.qkv) and transformers vision models "
        "whose attention has q_proj/k_proj (DINOv2, ViT, CLIP)"
    )


def patch_grid(model: nn.Module, pixels: torch.Tensor) -> tuple[int, int, int]:
    """``(grid_h, grid_w, patch)`` for ``pixels`` (B, 3, H, W): from the model's patch
    embedding, the first Conv2d whose stride equals its kernel."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == module.stride:
            ph, pw = module.kernel_size
            if ph != pw:
                raise TypeError(f"non-square patches {ph}x{pw} are not supported")
            return pixels.shape[-2] // ph, pixels.shape[-1] // pw, ph
    raise TypeError(f"cannot find the patch embedding (Conv2d) of a {type(model).__name__}")


# ------------------------------------------------------------------------ probing
def _cls_row(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Post-softmax attention of token 0: ``q, k`` (B, H, N, D) -> (B, H, N), float32."""
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k.float()) * scale
    return logits.softmax(dim=-1)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D); the head count comes from the tensor."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, width // head_dim, head_dim).transpose(1, 2)


@dataclasses.dataclass
class BlockCapture:
    """What one forward pass showed, per block: output hidden states ``(B, N, C)`` and the
    CLS attention row ``(B, H, N)`` (post-softmax, each head sums to 1)."""

    hidden: list[torch.Tensor | None]
    cls_rows: list[torch.Tensor | None]


class BlockProbe:
    """Forward hooks that record every block's output and CLS attention row.

    Use as a context manager around forward passes; read :attr:`capture` after each.
    The hooks only read tensors, so the model computes exactly what it would without them.
    """

    def __init__(self, model: nn.Module) -> None:
        self.blocks = find_attention_blocks(model)
        self.capture = self._empty()
        self._hooks: list[Any] = []
        self._pending: dict[int, dict[str, torch.Tensor]] = {}

    def _empty(self) -> BlockCapture:
        n = len(self.blocks)
        return BlockCapture([None] * n, [None] * n)

    def reset(self) -> None:
        """Forget the last forward pass."""
        self.capture = self._empty()
        self._pending.clear()

    def __enter__(self) -> BlockProbe:
        for index, entry in enumerate(self.blocks):
            self._hooks.append(entry.block.register_forward_hook(self._on_block(index)))
            attention = entry.attention
            if entry.kind == "qkv":
                self._hooks.append(attention.qkv.register_forward_hook(self._on_qkv(index)))
            else:
                for name in ("q_proj", "k_proj"):
                    hook = self._on_projection(index, name[0])
                    self._hooks.append(getattr(attention, name).register_forward_hook(hook))
                self._hooks.append(attention.register_forward_hook(self._on_attention(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._pending.clear()

    # hooks -------------------------------------------------------------------
    def _on_block(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple | list) else output
            self.capture.hidden[index] = hidden.detach()

        return hook

    def _on_qkv(self, index: int) -> Callable[..., None]:
        attention = self.blocks[index].attention

        def hook(module: nn.Module, args: Any, qkv: torch.Tensor) -> None:
            batch, tokens, width = qkv.shape
            head_dim = int(attention.head_dim)
            heads = width // (3 * head_dim)
            q, k, _ = qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            # timm applies q/k norms (Identity unless qk_norm) before the dot product
            q = attention.q_norm(q) if hasattr(attention, "q_norm") else q
            k = attention.k_norm(k) if hasattr(attention, "k_norm") else k
            scale = float(getattr(attention, "scale", head_dim**-0.5))
            self.capture.cls_rows[index] = _cls_row(q.detach(), k.detach(), scale)

        return hook

    def _on_projection(self, index: int, which: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            self._pending.setdefault(index, {})[which] = output.detach()

        return hook

    def _on_attention(self, index: int) -> Callable[..., None]:
        attention = self.blocks[index].attention

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            pending = self._pending.pop(index, {})
            if "q" not in pending or "k" not in pending:
                return  # q/k were not computed through the projections this time
            head_dim = int(
                getattr(attention, "head_dim", 0)
                or pending["q"].shape[-1] // int(attention.num_attention_heads)
            )
            scale = getattr(attention, "scaling", None) or getattr(attention, "scale", None)
            scale = float(scale) if scale is not None else head_dim**-0.5
            q, k = _heads(pending["q"], head_dim), _heads(pending["k"], head_dim)
            self.capture.cls_rows[index] = _cls_row(q, k, scale)

        return hook


def capture_blocks(loaded: LoadedModel, pixels: torch.Tensor) -> BlockCapture:
    """Run ``loaded`` on prepared ``pixels`` and return every block's capture."""
    with BlockProbe(loaded.module) as probe, torch.inference_mode():
        loaded.forward_features(loaded.module, pixels, None)
        capture = probe.capture
    missing = [i for i, row in enumerate(capture.cls_rows) if row is None]
    missing += [i for i, hidden in enumerate(capture.hidden) if hidden is None]
    if missing:
        raise RuntimeError(f"blocks {sorted(set(missing))} did not run through the probed layers")
    return capture


# ------------------------------------------------------------------------ metrics
def informativity_rows(
    loaded: LoadedModel, images: Sequence[Any], batch_size: int = _BATCH
) -> list[dict[str, float]]:
    """Per-block figures, averaged over ``images`` (PIL images or HxWx3 arrays).

    Returns one dict per block with ``block`` (1-based), ``tokens``, ``redundancy``,
    ``concentration`` (top 10% share of the CLS row over patches), ``entropy`` and
    ``cls_prefix_share`` (attention the CLS gives to itself and other prefix tokens).
    """
    from turbo_adapters import handle_of

    if loaded.handle is not None or handle_of(loaded.module) is not None:
        raise ValueError("the informativity study needs the unpatched model; remove Turbo first")
    if not images:
        raise ValueError("images: give at least one image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    totals: list[dict[str, float]] | None = None
    for start in range(0, len(images), batch_size):
        pixels = loaded.prepare(list(images[start : start + batch_size]))
        grid_h, grid_w, _ = patch_grid(loaded.module, pixels)
        capture = capture_blocks(loaded, pixels)
        if totals is None:
            totals = [dict.fromkeys((*_AVERAGED, "tokens"), 0.0) for _ in capture.hidden]
        for index, (hidden, rows) in enumerate(zip(capture.hidden, capture.cls_rows, strict=True)):
            assert hidden is not None and rows is not None
            prefix = hidden.shape[1] - grid_h * grid_w
            if prefix < 1:
                raise TypeError(
                    f"expected a CLS token before {grid_h}x{grid_w} patches, got "
                    f"{hidden.shape[1]} tokens"
                )
            row = rows.mean(dim=1)  # (B, N): Turbo's semantic value A
            patches = row[:, prefix:] / row[:, prefix:].sum(dim=-1, keepdim=True)
            figures = {
                "redundancy": token_redundancy(hidden[:, prefix:]),
                "concentration": attention_concentration(patches, TOP_FRACTION),
                "entropy": attention_entropy(patches),
                "cls_prefix_share": row[:, :prefix].sum(dim=-1),
            }
            for key, values in figures.items():
                totals[index][key] += float(values.double().sum())
            totals[index]["tokens"] = float(hidden.shape[1])
    assert totals is not None
    out = []
    for index, total in enumerate(totals):
        row_out = {"block": float(index + 1), "tokens": total["tokens"]}
        row_out.update({key: total[key] / len(images) for key in _AVERAGED})
        out.append(row_out)
    return out


# ------------------------------------------------------------------------ outputs
def write_informativity(
    rows: Sequence[dict[str, float]], out: str | Path, title: str = ""
) -> dict[str, Path]:
    """Write ``informativity.csv``, ``.md`` and ``.png`` into the folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out / "informativity.csv",
        "markdown": out / "informativity.md",
        "png": out / "informativity.png",
    }
    columns = ("block", "tokens", *_AVERAGED)
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(
                [int(row["block"]), int(row["tokens"])] + [f"{row[key]:.6f}" for key in _AVERAGED]
            )
    lines = [
        f"# Informativity per block{f': {title}' if title else ''}",
        "",
        "Redundancy: mean best cosine similarity between patch tokens (block output). "
        "Concentration: share of the CLS attention (heads averaged, over patches) held by the "
        f"top {TOP_FRACTION:.0%} patches. Entropy: of that row, normalised by log N.",
        "",
        f"| block | redundancy | concentration top-{TOP_FRACTION:.0%} | entropy |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {int(r['block'])} | {r['redundancy']:.4f} | {r['concentration']:.4f} "
        f"| {r['entropy']:.4f} |"
        for r in rows
    ]
    paths["markdown"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(rows, paths["png"], title)
    return paths


def _plot(rows: Sequence[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [int(r["block"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    try:
        left.plot(blocks, [r["redundancy"] for r in rows], "o-", color="tab:blue")
        left.set(xlabel="block", ylabel="mean max cosine similarity", title="token redundancy")
        right.plot(
            blocks,
            [r["concentration"] for r in rows],
            "o-",
            color="tab:red",
            label=f"concentration (top {TOP_FRACTION:.0%} share)",
        )
        right.plot(
            blocks,
            [r["entropy"] for r in rows],
            "s--",
            color="tab:gray",
            label="entropy (normalised)",
        )
        right.set(
            xlabel="block",
            ylabel="CLS attention",
            title="CLS attention over patches",
            ylim=(0, 1.02),
        )
        right.legend(loc="best", fontsize=8)
        for axis in (left, right):
            axis.set_xticks(blocks)
            axis.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def analyze_model(
    model: str,
    images: list[str],
    out: str,
    resolution: int | None = None,
    loaded: LoadedModel | None = None,
) -> dict[str, Path]:
    """The informativity study for ``model`` on ``images``; returns the written paths.

    Args:
        model: a name :func:`turbo_eval.models.load_model` knows (ignored for loading
            when ``loaded`` is given, then only used as the title).
        images: image files or folders (every jpg/png inside, sorted).
        out: output folder for ``informativity.csv``, ``.md`` and ``.png``.
        resolution: input size passed to the loader (model default when None).
        loaded: an already loaded model to use instead of loading ``model``.
    """
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    pictures = load_images(images)
    if loaded is None:
        loaded = load_model(model, resolution)
    if loaded.modality != "image":
        raise ValueError(f"model {model!r} is a {loaded.modality} model; analyze needs images")
    rows = informativity_rows(loaded, pictures)
    return write_informativity(rows, out, title=f"{model} ({len(pictures)} images)")


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``turbo-eval analyze``: the CSV and plot paths."""
    paths = analyze_model(args.model, args.images, out=args.out, resolution=args.resolution)
    for kind, path in paths.items():
        print(f"{kind:>8}: {path}")
    return 0
