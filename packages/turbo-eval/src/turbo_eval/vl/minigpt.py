"""MiniGPT-v2: from its official files, or random weights from its config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .assemble import Pixels, image_processor, vl_model
from .catalog import MINIGPT, TEMPLATES, _minigpt
from .heads import MiniGPTHead
from .model import VLModel
from .random_init import merged_config, scale_weights
from .tokenizers import tokenizer_for

__all__ = ["load_minigpt"]


def load_minigpt(options: Mapping[str, Any], weights: str) -> VLModel:
    """MiniGPT-v2: official files (``minigpt_checkpoint``, ``eva_weights``, ``llama_dir``)
    or, without them, random weights from the config."""
    from turbo_adapters.models import MiniGPTv2, MiniGPTv2Config, load_minigptv2

    paths = {k: options.get(k) for k in ("minigpt_checkpoint", "eva_weights", "llama_dir")}
    settings = merged_config(_minigpt(), options.get("config", {}))
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
        tokenizer = tokenizer_for(MINIGPT, "MiniGPTv2", config)
        kind = "random"
    processor = image_processor(MINIGPT, module.config.image_size)
    head = MiniGPTHead(
        module.config, tokenizer, Pixels(processor, module.config.image_size), TEMPLATES[MINIGPT]
    )
    return vl_model(MINIGPT, module, MINIGPT, head, tokenizer, kind)
