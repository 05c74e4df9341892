"""Vision-language models for the captioning, VQA and retrieval tasks.

:func:`load_vl_model` gives a :class:`~turbo_eval.vl.model.VLModel` (a :class:`~turbo_eval.models.LoadedModel`
with a call head, a tokenizer and an image processor) in one of two ways, nothing
downloaded:

- **pretrained**: a local folder saved with ``save_pretrained`` (model, tokenizer and,
  if present, image processor), or a hub id already in the local cache; loaded with
  ``from_pretrained(..., local_files_only=True)``. MiniGPT-v2 loads from its official
  files (``minigpt_checkpoint``, ``eva_weights``, ``llama_dir`` model options).
- **random**: a named checkpoint (:data:`NAMED_MODELS`, e.g.
  ``Salesforce/blip-image-captioning-base``: ViT-B/16 at 384 px and BERT-base, full
  size) built from its real configuration with random weights, a tokenizer made in code
  (:func:`~turbo_eval.vl.word_tokenizer.word_tokenizer`) and the family's image processor.
  Quality is then fidelity to the unpatched model. The library's initialisation
  (std 0.02) gives a random BLIP the same caption and the same logits for every photo,
  whatever Turbo does, so by default (``init = "scaled"``, :func:`~turbo_eval.vl.random_init.scale_weights`)
  weights are redrawn so that outputs depend on the image: variance 1 / fan-in, GPT-2's
  scaled residual branches, sharper attention.

Model options (a suite's ``[[models]]`` entry): ``weights`` ("auto": the folder or the
local cache when the id is there, else random; "random"; "pretrained"), ``init``
("scaled" or "library"), ``init_seed`` (int), ``config`` (a table of overrides of the
named config, e.g. ``config = {text_config = {num_hidden_layers = 2}}``), for
LLaVA ``llava_mode`` ("tower", "llm" or "both"), ``llm_layer``, ``llm_keep``,
``llm_method``, and for the cross-modal methods ``cross_reduce`` ("merge" or "prune")
and ``cross_vision_share`` (:mod:`turbo_eval.methods.cross_modal`).

InstructBLIP reads the instruction twice, with two tokenizers: the language model's and
the Q-Former's (BERT vocabulary); random-weight models get both made in code, a local
folder needs the ``InstructBlipProcessor`` saved with it (``qformer_tokenizer/``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .assemble import assemble, image_processor, vision_size
from .catalog import _CONFIG_CLASSES, MINIGPT, NAMED_MODELS, VL_ARCHITECTURES
from .minigpt import load_minigpt
from .model import VLModel
from .options import check_options
from .random_init import merged_config, scale_weights
from .tokenizers import bert_tokenizer, tokenizer_for

__all__ = ["load_vl_model"]

log = logging.getLogger(__name__)


def load_vl_model(
    name: str, resolution: int | None = None, options: Mapping[str, Any] | None = None
) -> VLModel:
    """A :class:`VLModel` from a local folder, the local cache, or a named config.

    Raises:
        ValueError: an option out of range (named), or ``weights = "pretrained"`` for a
            checkpoint that is neither a local folder nor in the local cache.
    """
    options = dict(options or {})
    check_options(options)
    weights = options.get("weights", "auto")
    if name == MINIGPT:
        model = load_minigpt(options, weights)
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
        processor = image_processor(family, vision_size(module.config))
    return assemble(name, module, architecture, tokenizer, processor, "pretrained", qformer)


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


def _random(name: str, options: Mapping[str, Any]) -> VLModel:
    import transformers

    if name not in NAMED_MODELS:
        raise ValueError(
            f"random weights need a named configuration; {name!r} is not one of "
            f"{sorted(NAMED_MODELS)}"
        )
    architecture, base = NAMED_MODELS[name]
    family = VL_ARCHITECTURES[architecture][0]
    settings = merged_config(base(), options.get("config", {}))
    config = getattr(transformers, _CONFIG_CLASSES[family])(**settings)
    torch.manual_seed(int(options.get("init_seed", 0)))
    module = getattr(transformers, architecture)(config).eval()
    if options.get("init", "scaled") == "scaled":
        scale_weights(module, int(options.get("init_seed", 0)))
    tokenizer = tokenizer_for(family, architecture, config)
    qformer = bert_tokenizer(config.qformer_config) if architecture in _QFORMER_TEXT else None
    processor = image_processor(family, vision_size(config))
    return assemble(name, module, architecture, tokenizer, processor, "random", qformer)
