"""The vision-language models turbo-eval knows: which transformers classes it drives (and
with which head), the named checkpoints it builds at full size from their real
configurations (random weights), their prompt templates, and what class a name or a local
folder loads as. Data only: the model class and loading are in :mod:`turbo_eval.vl`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .heads import (
    Blip2Head,
    Blip2ITMHead,
    BlipCaptionHead,
    BlipITMHead,
    BlipVQAHead,
    Head,
    InstructBlipHead,
    LlavaHead,
)

__all__ = [
    "CAPTION_PROMPTS",
    "MINIGPT",
    "NAMED_MODELS",
    "TEMPLATES",
    "VL_ARCHITECTURES",
    "is_vl_model",
    "vl_architecture",
]

#: transformers classes the tasks can drive: family and call head
VL_ARCHITECTURES: dict[str, tuple[str, type[Head]]] = {
    "BlipForConditionalGeneration": ("blip", BlipCaptionHead),
    "BlipForQuestionAnswering": ("blip", BlipVQAHead),
    "BlipForImageTextRetrieval": ("blip", BlipITMHead),
    "Blip2ForConditionalGeneration": ("blip2", Blip2Head),
    "Blip2ForImageTextRetrieval": ("blip2", Blip2ITMHead),
    "InstructBlipForConditionalGeneration": ("instructblip", InstructBlipHead),
    "LlavaForConditionalGeneration": ("llava", LlavaHead),
}
MINIGPT = "minigpt-v2"

#: prompt templates per family ({text}: the caption prompt or the question)
TEMPLATES = {
    "blip": {"caption": "{text}", "vqa": "{text}"},
    "blip2": {"caption": "{text}", "vqa": "Question: {text} Answer:"},
    # LAVIS's InstructBLIP prompts (the caption prompt is the instruction itself)
    "instructblip": {"caption": "{text}", "vqa": "Question: {text} Short answer:"},
    "llava": {
        "caption": "USER: <image>\n{text} ASSISTANT:",
        "vqa": "USER: <image>\n{text} ASSISTANT:",
    },
    MINIGPT: {
        "caption": "[INST] <Img><ImageHere></Img> [caption] {text} [/INST]",
        "vqa": "[INST] <Img><ImageHere></Img> [vqa] {text} [/INST]",
    },
}
#: the caption prompt a family gets when a task gives none
CAPTION_PROMPTS = {
    "blip": "a picture of",
    "blip2": "",
    "instructblip": "A short image caption:",
    "llava": "Describe the image briefly.",
    MINIGPT: "Briefly describe this image.",
}
_PROMPT_WORDS = ("inst", "img", "imagehere", "vqa", "[", "]", "/", "<", ">", "question", "answer")


def _blip(large: bool = False) -> dict[str, Any]:
    width = 1024 if large else 768
    return {
        "vision_config": {
            "hidden_size": width, "intermediate_size": 4 * width,
            "num_hidden_layers": 24 if large else 12, "num_attention_heads": 16 if large else 12,
            "image_size": 384, "patch_size": 16, "layer_norm_eps": 1e-5, "hidden_act": "gelu",
        },
        "text_config": {
            "vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "encoder_hidden_size": width,
            "max_position_embeddings": 512, "bos_token_id": 30522, "sep_token_id": 102,
            "eos_token_id": 2, "pad_token_id": 0, "layer_norm_eps": 1e-12,
        },
        "projection_dim": 512, "image_text_hidden_size": 256,
    }  # fmt: skip


_VIT_G = {
    "hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
    "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "qkv_bias": True,
    "layer_norm_eps": 1e-6, "hidden_act": "gelu",
}  # fmt: skip
_QFORMER = {
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "encoder_hidden_size": 1408, "cross_attention_frequency": 2,
    "max_position_embeddings": 512, "pad_token_id": 0,
}  # fmt: skip


def _blip2_opt() -> dict[str, Any]:
    return {
        "vision_config": dict(_VIT_G),
        "qformer_config": dict(_QFORMER),
        "text_config": {
            "model_type": "opt", "vocab_size": 50272, "hidden_size": 2560,
            "num_hidden_layers": 32, "ffn_dim": 10240, "num_attention_heads": 32,
            "max_position_embeddings": 2048, "word_embed_proj_dim": 2560,
            "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
        },
        "num_query_tokens": 32, "image_token_index": 50265,
    }  # fmt: skip


def _blip2_itm() -> dict[str, Any]:
    return {
        "vision_config": dict(_VIT_G),
        "qformer_config": {**_QFORMER, "use_qformer_text_input": True},
        "num_query_tokens": 32, "image_token_index": None, "image_text_hidden_size": 256,
    }  # fmt: skip


def _instructblip(language: str) -> dict[str, Any]:
    """Salesforce/instructblip-vicuna-7b (LLaMA) or -flan-t5-xl: BLIP-2's tower and
    Q-Former, whose text input reads the instruction with a BERT vocabulary + ``[DEC]``."""
    if language == "vicuna":
        text = {
            "model_type": "llama", "vocab_size": 32002, "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "tie_word_embeddings": False,
        }  # fmt: skip
        image = 32001
    else:
        text = {
            "model_type": "t5", "vocab_size": 32128, "d_model": 2048, "d_kv": 64,
            "d_ff": 5120, "num_layers": 24, "num_heads": 32, "feed_forward_proj": "gated-gelu",
            "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0,
            "tie_word_embeddings": False,
        }  # fmt: skip
        image = 32100
    return {
        "vision_config": dict(_VIT_G),
        "qformer_config": {**_QFORMER, "vocab_size": 30523},
        "text_config": text,
        "num_query_tokens": 32, "image_token_index": image,
    }  # fmt: skip


def _llava15() -> dict[str, Any]:
    return {
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336,
            "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
        },
        "text_config": {
            "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "pad_token_id": 32001,
        },
        "image_token_id": 32000, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default", "image_seq_length": 576,
        "pad_token_id": 32001,
    }  # fmt: skip


def _minigpt() -> dict[str, Any]:
    return {
        "llama": {
            "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
            "pad_token_id": 0,
        }
    }  # fmt: skip


#: checkpoints built with random weights from their real configuration: (class, config)
NAMED_MODELS: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "Salesforce/blip-image-captioning-base": ("BlipForConditionalGeneration", _blip),
    "Salesforce/blip-image-captioning-large": (
        "BlipForConditionalGeneration", lambda: _blip(large=True)
    ),
    "Salesforce/blip-itm-base-coco": ("BlipForImageTextRetrieval", _blip),
    "Salesforce/blip-itm-base-flickr": ("BlipForImageTextRetrieval", _blip),
    "Salesforce/blip-itm-large-coco": ("BlipForImageTextRetrieval", lambda: _blip(large=True)),
    "Salesforce/blip-itm-large-flickr": ("BlipForImageTextRetrieval", lambda: _blip(large=True)),
    "Salesforce/blip-vqa-base": ("BlipForQuestionAnswering", _blip),
    "Salesforce/blip-vqa-capfilt-large": ("BlipForQuestionAnswering", lambda: _blip(large=True)),
    "Salesforce/blip2-opt-2.7b": ("Blip2ForConditionalGeneration", _blip2_opt),
    "Salesforce/blip2-itm-vit-g": ("Blip2ForImageTextRetrieval", _blip2_itm),
    "Salesforce/instructblip-vicuna-7b": (
        "InstructBlipForConditionalGeneration", lambda: _instructblip("vicuna")
    ),
    "Salesforce/instructblip-flan-t5-xl": (
        "InstructBlipForConditionalGeneration", lambda: _instructblip("flan-t5")
    ),
    "llava-hf/llava-1.5-7b-hf": ("LlavaForConditionalGeneration", _llava15),
    MINIGPT: ("MiniGPTv2", _minigpt),
}  # fmt: skip

_CONFIG_CLASSES = {
    "blip": "BlipConfig", "blip2": "Blip2Config", "instructblip": "InstructBlipConfig",
    "llava": "LlavaConfig",
}  # fmt: skip


def is_vl_model(name: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``name`` is a named VL checkpoint or a local folder of a VL class."""
    return vl_architecture(name) is not None


def vl_architecture(name: str) -> str | None:
    """The class a named VL checkpoint or a local VL folder loads as (None: neither)."""
    if name in NAMED_MODELS:
        return NAMED_MODELS[name][0]
    path = Path(name).expanduser()
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        try:
            architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures")
        except (OSError, ValueError):
            return None
        return next((a for a in architectures or () if a in VL_ARCHITECTURES), None)
    return None
