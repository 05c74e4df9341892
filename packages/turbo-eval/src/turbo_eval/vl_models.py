"""Vision-language models for the captioning, VQA and retrieval tasks.

:func:`load_vl_model` gives a :class:`VLModel` (a :class:`~turbo_eval.models.LoadedModel`
with a call head, a tokenizer and an image processor) in one of two ways, nothing
downloaded:

- **pretrained**: a local folder saved with ``save_pretrained`` (model, tokenizer and,
  if present, image processor), or a hub id already in the local cache; loaded with
  ``from_pretrained(..., local_files_only=True)``. MiniGPT-v2 loads from its official
  files (``minigpt_checkpoint``, ``eva_weights``, ``llama_dir`` model options).
- **random**: a named checkpoint (:data:`NAMED_MODELS`, e.g.
  ``Salesforce/blip-image-captioning-base``: ViT-B/16 at 384 px and BERT-base, full
  size) built from its real configuration with random weights, a tokenizer made in code
  (:func:`~turbo_eval.vl_tokenizer.word_tokenizer`) and the family's image processor.
  Quality is then fidelity to the unpatched model. The library's initialisation
  (std 0.02) gives a random BLIP the same caption and the same logits for every photo,
  whatever Turbo does, so by default (``init = "scaled"``, :func:`scale_weights`)
  weights are redrawn so that outputs depend on the image: variance 1 / fan-in, GPT-2's
  scaled residual branches, sharper attention.

Model options (a suite's ``[[models]]`` entry): ``weights`` ("auto": the folder or the
local cache when the id is there, else random; "random"; "pretrained"), ``init``
("scaled" or "library"), ``init_seed`` (int), ``config`` (a table of overrides of the
named config, e.g. ``config = {text_config = {num_hidden_layers = 2}}``), for
LLaVA ``llava_mode`` ("tower", "llm" or "both"), ``llm_layer``, ``llm_keep``,
``llm_method``, and for the cross-modal methods ``cross_reduce`` ("merge" or "prune")
and ``cross_vision_share`` (:mod:`turbo_eval.cross_modal`).

InstructBLIP reads the instruction twice, with two tokenizers: the language model's and
the Q-Former's (BERT vocabulary); random-weight models get both made in code, a local
folder needs the ``InstructBlipProcessor`` saved with it (``qformer_tokenizer/``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .loaded_model import LoadedModel
from .names import CROSS_MODAL, CROSS_SITE, SIZE_BIAS
from .vl_catalog import (
    _CONFIG_CLASSES,
    _PROMPT_WORDS,
    CAPTION_PROMPTS,
    MINIGPT,
    NAMED_MODELS,
    TEMPLATES,
    VL_ARCHITECTURES,
    _minigpt,
    is_vl_model,
    vl_architecture,
)
from .vl_data import VLSample
from .vl_heads import (
    Blip2ITMHead,
    BlipITMHead,
    Generation,
    Head,
    MiniGPTHead,
    RetrievalSession,
)

__all__ = [
    "NAMED_MODELS",
    "VL_ARCHITECTURES",
    "SpeedInputs",
    "VLModel",
    "VLSample",
    "is_vl_model",
    "load_vl_model",
    "scale_weights",
    "vl_architecture",
]

log = logging.getLogger(__name__)

_OPTION_CHOICES = {
    "weights": ("auto", "random", "pretrained"),
    "init": ("scaled", "library"),
    "llava_mode": ("tower", "llm", "both"),
    "llm_method": ("prune", "merge"),
    "cross_reduce": ("merge", "prune"),
}
#: Every model option a VL model reads (the module docstring says what each means).
VL_OPTIONS = (
    *_OPTION_CHOICES,
    "init_seed",
    "config",
    "llm_layer",
    "llm_keep",
    "cross_vision_share",
    "minigpt_checkpoint",
    "eva_weights",
    "llama_dir",
)


# --------------------------------------------------------------------- items
@dataclasses.dataclass
class SpeedInputs:
    """Prepared inputs of the timed call (``LoadedModel.prepare`` for a VL model)."""

    inputs: dict[str, Any]
    max_new_tokens: int


def _as_image(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(array[:, :, :3]))


# --------------------------------------------------------------------- model
@dataclasses.dataclass
class VLModel(LoadedModel):
    """A captioning, VQA or image-text matching model with its tokenizer and processor.

    ``prepare`` / ``forward_features`` are the timed call of the runner's throughput
    cells: greedy generation of exactly ``SpeedInputs.max_new_tokens`` tokens (caption
    and VQA heads) or the ITM forward on image-text pairs (matching heads).

    Attributes:
        head: the family's call logic (:mod:`turbo_eval.vl_heads`).
        family: ``"blip"``, ``"blip2"``, ``"llava"`` or ``"minigpt-v2"``.
        weights: ``"pretrained"`` or ``"random"`` (then quality is fidelity only).
        tokenizer: the text tokenizer.
        speed_purpose: what the timed call's texts are (``"caption"`` or ``"vqa"``).
        speed_tokens: tokens the timed call generates (the task sets both).
    """

    head: Head | None = None
    family: str = ""
    weights: str = "pretrained"
    tokenizer: Any = None
    speed_purpose: str = "caption"
    speed_tokens: int = 20
    #: the split of the cross-modal method in use (None for any other method)
    cross_split: dict[str, Any] | None = None
    #: cross-modal splits searched so far (:mod:`turbo_eval.cross_modal`)
    cross_splits: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the patch that has the size bias downstream (:mod:`turbo_eval.size_bias`), if any
    _biased: Any = dataclasses.field(default=None, repr=False)
    _flops_probe: list[VLSample] = dataclasses.field(default_factory=list)

    @property
    def kind(self) -> str:
        """``"generate"`` (captions, answers) or ``"match"`` (image-text retrieval)."""
        return self._head.kind

    @property
    def _head(self) -> Head:
        if self.head is None:
            raise TypeError(f"model {self.name!r} has no vision-language head")
        return self.head

    @property
    def caption_prompt(self) -> str:
        return CAPTION_PROMPTS.get(self.family, "")

    def purposes(self) -> tuple[str, ...]:
        return self._head.purposes

    # ---------------------------------------------------------- calls
    def inputs(self, samples: Sequence[VLSample], purpose: str) -> dict[str, Any]:
        return self._head.inputs([s.image for s in samples], [s.text for s in samples], purpose)

    def generate(
        self, samples: Sequence[VLSample], purpose: str, max_new_tokens: int
    ) -> Generation:
        """Greedy captions or answers of the current method (patched or not)."""
        with torch.inference_mode():
            return self._head.generate(self.module, self.inputs(samples, purpose), max_new_tokens)

    def teacher_forced(
        self, samples: Sequence[VLSample], purpose: str, tokens: torch.Tensor
    ) -> torch.Tensor:
        """``(B, T, V)`` logits predicting each of ``tokens`` given the ones before."""
        with torch.inference_mode():
            inputs = self.inputs(samples, purpose)
            return self._head.teacher_forced(self.module, inputs, tokens)

    def retrieval(
        self, images: Sequence[Any], texts: Sequence[str], batch_size: int
    ) -> RetrievalSession:
        """ITC and ITM scores of ``images`` against ``texts`` (matching heads only)."""
        head = self._head
        if not isinstance(head, (BlipITMHead, Blip2ITMHead)):
            raise TypeError(f"model {self.name!r} has no image-text matching head")
        with torch.inference_mode():  # the session's own calls run without gradients too
            return head.retrieval(self.module, images, texts, batch_size)

    def end_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B,)`` number of real tokens per row: up to and including the first end token."""
        found = tokens == self._head.eos_id
        first = torch.where(found.any(1), found.int().argmax(1) + 1, tokens.shape[1])
        return first

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Text of generated tokens (up to the end token, special tokens dropped)."""
        ends = self.end_index(tokens)
        rows = [row[:end].tolist() for row, end in zip(tokens, ends, strict=True)]
        return [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    def example_inputs(self) -> Any:
        """Keyword inputs of the timed call on two noise images (for model-side steps)."""
        noise = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
        return self.prepare([VLSample(image, "a b") for image in noise]).inputs

    # -------------------------------------------------------- methods
    def set_method(self, overrides: dict[str, Any] | None) -> None:
        """As :meth:`LoadedModel.set_method`, then the LLaVA options. A cross-modal or
        size-bias method is applied by :func:`turbo_eval.methods.apply_method`."""
        if overrides and (CROSS_MODAL in overrides or SIZE_BIAS in overrides):
            raise TypeError(
                f"model {self.name!r}: cross-modal and size-bias methods are applied by "
                "turbo_eval.methods.apply_method, not VLModel.set_method"
            )
        if self.handle is not None and (
            CROSS_SITE in self.handle.sites or self.handle is self._biased
        ):
            self.handle.remove()  # a plain method runs with exactly its own sites and options
            self.handle = None
        super().set_method(overrides)
        self.settle_family_options()

    def settle_family_options(self) -> None:
        """The family's own patch settings from the model options (LLaVA's mode and LLM-mode
        reduction), after any change of the patch."""
        if self.handle is not None and self.family == "llava":
            _llava_settings(self.handle, self.options)

    def set_flops_probe(self, samples: Sequence[VLSample]) -> None:
        """The items whose timed call a cross-modal split is matched on (tasks set their
        first two speed items); the splits found so far are forgotten."""
        self._flops_probe = list(samples)
        self.cross_splits.clear()

    def flops_probe_items(self) -> list[VLSample]:
        """The probe items (two noise images with a short text when no task set them)."""
        if not self._flops_probe:
            noise = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
            self._flops_probe = [VLSample(image, "what is in the picture") for image in noise]
        return self._flops_probe

    def probe_inputs(self) -> SpeedInputs:
        """The prepared timed-call inputs of the probe items."""
        return self.prepare(self.flops_probe_items())


def _llava_settings(handle: Any, options: Mapping[str, Any]) -> None:
    """LLaVA's LLM mode from the model options (tower mode is the adapter's default)."""
    mode = options.get("llava_mode")
    if mode is None:
        return
    from turbo_adapters.families.llava.llm import LLMReduction

    wanted = LLMReduction(
        layer=int(options.get("llm_layer", 2)),
        keep=float(options.get("llm_keep", 0.5)),
        method=str(options.get("llm_method", "prune")),
    )
    if handle.llm != wanted:
        handle.llm = wanted
    handle.modes = mode


# ------------------------------------------------------------------ loading
def _check_options(options: Mapping[str, Any]) -> None:
    for key, allowed in _OPTION_CHOICES.items():
        if key in options and options[key] not in allowed:
            raise ValueError(
                f"model option {key} must be one of {list(allowed)}, got {options[key]!r}"
            )
    for key in ("init_seed", "llm_layer"):
        value = options.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"model option {key} must be an int >= 0, got {value!r}")
    keep = options.get("llm_keep", 0.5)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"model option llm_keep must be a number in (0, 1], got {keep!r}")
    share = options.get("cross_vision_share", 0.0)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise ValueError(
            f"model option cross_vision_share must be a number in [0, 1], got {share!r}"
        )
    if not isinstance(options.get("config", {}), Mapping):
        raise ValueError(f"model option config must be a table, got {options['config']!r}")


def load_vl_model(
    name: str, resolution: int | None = None, options: Mapping[str, Any] | None = None
) -> VLModel:
    """A :class:`VLModel` from a local folder, the local cache, or a named config.

    Raises:
        ValueError: an option out of range (named), or ``weights = "pretrained"`` for a
            checkpoint that is neither a local folder nor in the local cache.
    """
    options = dict(options or {})
    _check_options(options)
    weights = options.get("weights", "auto")
    if name == MINIGPT:
        model = _load_minigpt(options, weights)
    elif weights == "random":
        model = _random(name, options)
    else:
        try:
            model = _pretrained(name)
        except OSError as error:
            if weights == "pretrained" or name not in NAMED_MODELS:
                raise ValueError(
                    f"model {name!r}: no local folder or cached checkpoint ({error}); "
                    'set weights = "random" for a named checkpoint\'s config with random weights'
                ) from error
            log.info("%s is not in the local cache: random weights from its config", name)
            model = _random(name, options)
    size = model.head.pixels.size if model.head is not None else None  # type: ignore[attr-defined]
    if resolution is not None and size is not None and resolution != size:
        raise ValueError(
            f"resolution must be the model's own image size {size} for {name!r} (its position "
            f"embeddings are fixed), got {resolution}"
        )
    model.options = options
    return model


class _Pixels:
    """Images (arrays, files, PIL) -> the model's pixel tensor, through a transformers
    image processor."""

    def __init__(self, processor: Any, size: int) -> None:
        self.processor = processor
        self.size = size

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        if not len(images):
            raise ValueError("images must not be empty")
        batch = self.processor([_as_image(i) for i in images], return_tensors="pt")
        return batch["pixel_values"]


def _image_processor(family: str, size: int) -> Any:
    import transformers

    if family == "llava":
        return transformers.CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    return transformers.BlipImageProcessor(size={"height": size, "width": size})


def _vision_size(config: Any) -> int:
    vision = getattr(config, "vision_config", None)
    return int(vision.image_size if vision is not None else config.image_size)


def _assemble(
    name: str,
    module: nn.Module,
    architecture: str,
    tokenizer: Any,
    processor: Any,
    weights: str,
    qformer_tokenizer: Any = None,
) -> VLModel:
    family, head_class = VL_ARCHITECTURES[architecture]
    config = module.config
    size = _vision_size(config)
    extra = {} if qformer_tokenizer is None else {"qformer_tokenizer": qformer_tokenizer}
    head = head_class(config, tokenizer, _Pixels(processor, size), TEMPLATES[family], **extra)
    return _vl_model(name, module, family, head, tokenizer, weights)


def _vl_model(
    name: str, module: nn.Module, family: str, head: Head, tokenizer: Any, weights: str
) -> VLModel:
    def prepare(items: Sequence[Any]) -> SpeedInputs:
        samples = [i if isinstance(i, VLSample) else VLSample(i, "") for i in items]
        purpose = model.speed_purpose if model.speed_purpose in head.purposes else head.purposes[0]
        texts = [s.text or (model.caption_prompt if purpose == "caption" else "") for s in samples]
        inputs = head.inputs([s.image for s in samples], texts, purpose)
        return SpeedInputs(inputs, model.speed_tokens)

    def forward(module: nn.Module, prepared: SpeedInputs, handle: Any) -> Any:
        return head.speed(module, prepared.inputs, prepared.max_new_tokens)

    model = VLModel(
        name, module.eval(), "vision-language", prepare, forward,
        head=head, family=family, weights=weights, tokenizer=tokenizer,
    )  # fmt: skip
    return model


def _pretrained(name: str) -> VLModel:
    """``from_pretrained`` on a local folder or a cached hub id (never downloads)."""
    import transformers

    source = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
    config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    architecture = next(
        (a for a in getattr(config, "architectures", None) or () if a in VL_ARCHITECTURES), None
    )
    if architecture is None and name in NAMED_MODELS:
        architecture = NAMED_MODELS[name][0]
    if architecture is None:
        raise ValueError(
            f"{name!r} holds {getattr(config, 'architectures', None)}; the vision-language "
            f"tasks drive {sorted(VL_ARCHITECTURES)}"
        )
    folder = Path(source)
    if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        # transformers would build an empty tokenizer from the model type instead
        raise OSError(f"no tokenizer saved in {folder} (none of {list(_TOKENIZER_FILES)})")
    module = getattr(transformers, architecture).from_pretrained(source, local_files_only=True)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise OSError(f"no tokenizer saved with {name!r}: {error}") from error
    vocab = _text_vocab(module.config, architecture)
    if vocab and len(tokenizer) < vocab // 2:
        raise OSError(
            f"the tokenizer found for {name!r} has {len(tokenizer)} tokens for a vocabulary of "
            f"{vocab}: save the checkpoint's own tokenizer with it"
        )
    qformer = _saved_qformer_tokenizer(source, name) if architecture in _QFORMER_TEXT else None
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        family = VL_ARCHITECTURES[architecture][0]
        processor = _image_processor(family, _vision_size(module.config))
    return _assemble(name, module, architecture, tokenizer, processor, "pretrained", qformer)


#: classes whose Q-Former reads the text with a tokenizer of its own
_QFORMER_TEXT = ("InstructBlipForConditionalGeneration",)


def _saved_qformer_tokenizer(source: str, name: str) -> Any:
    """The Q-Former tokenizer saved with a checkpoint: ``InstructBlipProcessor.save_pretrained``
    puts it in the folder ``qformer_tokenizer``."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(
            source, subfolder="qformer_tokenizer", local_files_only=True
        )
    except (OSError, ValueError, TypeError) as error:
        raise OSError(
            f"no Q-Former tokenizer saved with {name!r} (InstructBLIP reads the instruction "
            "with it): save the InstructBlipProcessor, whose qformer_tokenizer goes to the "
            f"folder qformer_tokenizer ({error})"
        ) from error


_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
)  # fmt: skip


def _text_vocab(config: Any, architecture: str) -> int:
    """The vocabulary the tokenizer serves (BLIP-2's ITM reads text with the Q-Former's)."""
    parts = (
        ("qformer_config",) if architecture == "Blip2ForImageTextRetrieval" else ("text_config",)
    )
    for part in parts:
        sub = getattr(config, part, None)
        if sub is not None and getattr(sub, "vocab_size", None):
            return int(sub.vocab_size)
    return 0


def _merged(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        kind = value.get("model_type") if isinstance(value, Mapping) else None
        same_kind = isinstance(out.get(key), dict) and kind in (None, out[key].get("model_type"))
        if isinstance(value, Mapping) and same_kind:  # another model type replaces the part
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _random(name: str, options: Mapping[str, Any]) -> VLModel:
    import transformers

    if name not in NAMED_MODELS:
        raise ValueError(
            f"random weights need a named configuration; {name!r} is not one of "
            f"{sorted(NAMED_MODELS)}"
        )
    architecture, base = NAMED_MODELS[name]
    family = VL_ARCHITECTURES[architecture][0]
    settings = _merged(base(), options.get("config", {}))
    config = getattr(transformers, _CONFIG_CLASSES[family])(**settings)
    torch.manual_seed(int(options.get("init_seed", 0)))
    module = getattr(transformers, architecture)(config).eval()
    if options.get("init", "scaled") == "scaled":
        scale_weights(module, int(options.get("init_seed", 0)))
    tokenizer = _tokenizer_for(family, architecture, config)
    qformer = _bert_tokenizer(config.qformer_config) if architecture in _QFORMER_TEXT else None
    processor = _image_processor(family, _vision_size(config))
    return _assemble(name, module, architecture, tokenizer, processor, "random", qformer)


#: attention projections whose weights :func:`scale_weights` multiplies by its gain
_QUERY_KEY = ("query", "key", "q_proj", "k_proj")
#: the last projection of a residual branch (attention output, MLP output) in a layer
_BRANCH_OUT = ("projection", "proj", "out_proj", "o_proj", "fc2", "down_proj")


def _branch_output(name: str) -> bool:
    parts = [p for p in name.split(".") if p != "base_layer"]  # a peft-wrapped Linear
    # BERT-style layers (BLIP text, Q-Former): attention.output.dense, output.dense
    return parts[-1] in _BRANCH_OUT or (
        parts[-1] == "dense" and len(parts) > 1 and parts[-2].startswith("output")
    )


@torch.no_grad()
def scale_weights(module: nn.Module, seed: int = 0, attention_gain: float = 2.0) -> nn.Module:
    """Random weights under which a deep model's outputs depend on its input.

    Every Linear, convolution and embedding weight is drawn with variance 1 / fan-in;
    in each stack of L layers the last projection of every residual branch (attention
    output, MLP output) is scaled by 1 / sqrt(2 L), GPT-2's scaled initialisation; query
    and key projections (``query``/``key``, ``q_proj``/``k_proj``, the q and k rows of a
    fused ``qkv``) are multiplied by ``attention_gain``.

    Why: with the library's std 0.02 the image hardly reaches a decoder's residual
    stream, and in a deep post-norm stack (BLIP's BERT-base encoder and decoders) at unit
    gain every token's representation converges to the same vector (rank collapse), so
    every question gets the same answer distribution whatever the image or the method;
    near-uniform attention over 577 image tokens also returns about their mean. Trained
    models keep tokens apart and attend sharply: the scaled branches keep each token's
    own signal through depth, and a gain of 2 puts the attention logits' standard
    deviation near 4.
    """
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for name, layer in module.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)):
            continue
        weight = layer.weight
        if id(weight) in seen or weight.dim() < 2:
            continue
        seen.add(id(weight))
        fan = weight.shape[1] if isinstance(layer, nn.Embedding) else weight[0].numel()
        weight.copy_(torch.randn(weight.shape, generator=generator) / fan**0.5)
        parts = name.split(".")
        leaf = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]  # peft
        if leaf in _QUERY_KEY:
            weight.mul_(attention_gain)
        elif leaf == "qkv" and weight.shape[0] % 3 == 0:
            weight[: 2 * weight.shape[0] // 3].mul_(attention_gain)
    for stack in module.modules():
        if not isinstance(stack, nn.ModuleList) or len(stack) < 1:
            continue
        if len({type(layer) for layer in stack}) != 1:
            continue
        scale = (2 * len(stack)) ** -0.5
        for layer in stack:
            for name, sub in layer.named_modules():
                if isinstance(sub, nn.Linear) and _branch_output(name):
                    sub.weight.mul_(scale)
    return module


def _tokenizer_for(family: str, architecture: str, config: Any) -> Any:
    """A word-level tokenizer laid out on the config's vocabulary and special ids."""
    from .vl_tokenizer import word_tokenizer

    free = _free_id
    if family == "blip":
        return _bert_tokenizer(config.text_config, blip_text=True)
    if architecture == "Blip2ForImageTextRetrieval":
        return _bert_tokenizer(config.qformer_config)
    text = config.llama if family == MINIGPT else config.text_config
    vocab = int(text.vocab_size)
    image = getattr(config, "image_token_id", None)
    if image is None:
        image = getattr(config, "image_token_index", None)
    placeholder = {} if image is None else {"<image>": int(image)}
    if getattr(text, "model_type", "") == "t5":
        pad, eos = int(text.pad_token_id), int(text.eos_token_id)
        taken = {pad, eos, *placeholder.values()}
        specials = {"<pad>": pad, "</s>": eos, **placeholder, "<unk>": free(2, taken, vocab)}
        template: tuple[str | None, str | None] = (None, "</s>")
        roles = {"pad_token": "<pad>", "eos_token": "</s>"}
    else:
        bos = int(text.bos_token_id if text.bos_token_id is not None else 1)
        eos = int(text.eos_token_id if text.eos_token_id is not None else 2)
        bos_name = "</s>" if bos == eos else "<s>"
        specials = {bos_name: bos, "</s>": eos, **placeholder}
        taken = {bos, eos, *placeholder.values()}
        roles = {"bos_token": bos_name, "eos_token": "</s>"}
        pad = text.pad_token_id
        if pad is not None and int(pad) not in taken:
            specials["<pad>"] = int(pad)
            taken.add(int(pad))
        specials["<unk>"] = free(3 if family == "blip2" else 0, taken, vocab)
        # the pad role: its own token, or the token already on the pad id, else <unk>
        by_id = {i: t for t, i in specials.items()}
        roles["pad_token"] = by_id[int(pad)] if pad is not None else "<unk>"
        template = (bos_name, None)
    return word_tokenizer(
        vocab, specials, unk_token="<unk>", template=template, extra_words=_PROMPT_WORDS, **roles
    )


def _free_id(preferred: int, taken: set[int], vocab: int) -> int:
    """``preferred`` if it is free, else the highest free id below the vocabulary's end."""
    index = preferred if preferred < vocab and preferred not in taken else vocab - 1
    while index in taken:
        index -= 1
    taken.add(index)
    return index


def _bert_tokenizer(text: Any, blip_text: bool = False) -> Any:
    """A BERT-style word-level tokenizer (``[CLS] text [SEP]``) for BLIP's text side
    (``blip_text``: its ``[SEP]`` and ``[DEC]`` ids from the config) or a Q-Former."""
    from .vl_tokenizer import word_tokenizer

    vocab = int(text.vocab_size)
    pad = int(text.pad_token_id or 0)
    specials = {"[PAD]": pad}
    taken = {pad}
    if blip_text:
        specials["[SEP]"] = int(text.sep_token_id)
        specials["[DEC]"] = int(text.bos_token_id)
        taken |= {specials["[SEP]"], specials["[DEC]"]}
    else:
        specials["[SEP]"] = _free_id(102, taken, vocab)
    for token, preferred in (("[UNK]", 100), ("[CLS]", 101), ("[MASK]", 103)):
        specials[token] = _free_id(preferred, taken, vocab)
    roles = {"pad_token": "[PAD]", "sep_token": "[SEP]", "cls_token": "[CLS]"}
    roles.update(mask_token="[MASK]", eos_token="[SEP]")
    if blip_text:
        roles["bos_token"] = "[DEC]"
    return word_tokenizer(vocab, specials, unk_token="[UNK]", template=("[CLS]", "[SEP]"), **roles)


def _load_minigpt(options: Mapping[str, Any], weights: str) -> VLModel:
    """MiniGPT-v2: official files (``minigpt_checkpoint``, ``eva_weights``, ``llama_dir``)
    or, without them, random weights from the config."""
    from turbo_adapters.models import MiniGPTv2, MiniGPTv2Config, load_minigptv2

    paths = {k: options.get(k) for k in ("minigpt_checkpoint", "eva_weights", "llama_dir")}
    settings = _merged(_minigpt(), options.get("config", {}))
    if weights != "random" and all(paths.values()):
        import transformers

        config = MiniGPTv2Config(**{k: v for k, v in settings.items() if k != "llama"})
        module, report = load_minigptv2(
            paths["minigpt_checkpoint"], paths["eva_weights"], paths["llama_dir"], config
        )
        if not report.ok:
            raise ValueError(
                f"MiniGPT-v2 files do not match the model: missing {report.missing}, "
                f"unexpected {report.unexpected}"
            )
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            paths["llama_dir"], local_files_only=True
        )
        kind = "pretrained"
    elif weights == "pretrained" or any(paths.values()):
        missing = sorted(k for k, v in paths.items() if not v)
        raise ValueError(f"MiniGPT-v2 pretrained weights need the model options {missing}")
    else:
        from transformers import LlamaConfig

        llama = LlamaConfig(**settings.pop("llama"))
        config = MiniGPTv2Config(**settings, llama=llama)
        torch.manual_seed(int(options.get("init_seed", 0)))
        module = MiniGPTv2(config)
        if options.get("init", "scaled") == "scaled":
            scale_weights(module, int(options.get("init_seed", 0)))
        tokenizer = _tokenizer_for(MINIGPT, "MiniGPTv2", config)
        kind = "random"
    processor = _image_processor(MINIGPT, module.config.image_size)
    head = MiniGPTHead(
        module.config, tokenizer, _Pixels(processor, module.config.image_size), TEMPLATES[MINIGPT]
    )
    return _vl_model(MINIGPT, module, MINIGPT, head, tokenizer, kind)
