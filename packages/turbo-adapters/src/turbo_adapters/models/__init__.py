"""Models assembled from maintained parts (timm, transformers, peft) for families that ship none."""

from .minigpt import (
    MiniGPTv2,
    MiniGPTv2Config,
    load_minigptv2,
    official_lora_key,
    prompt_layout,
)

__all__ = [
    "MiniGPTv2",
    "MiniGPTv2Config",
    "load_minigptv2",
    "official_lora_key",
    "prompt_layout",
]
