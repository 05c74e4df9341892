"""Tiny causal language models for the GPTQ tests: configs, and a saved folder with a
word-level tokenizer (gptqmodel loads the model and its tokenizer from a folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

VOCAB, HIDDEN = 128, 64
PAD, EOS, BOS = 1, 2, 3
#: The last id: image placeholders of LLaVA and BLIP-2 prompts.
IMAGE_TOKEN = VOCAB - 1


def llama_config(layers: int = 2) -> Any:
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip


def opt_config() -> Any:
    return transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=HIDDEN,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip


#: the decoder of Qwen2-VL and Qwen2.5-VL at tiny size (grouped KV heads and q/k/v
#: biases as in Qwen2); every width a multiple of the GPTQ group size (32)
QWEN2 = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 256,
}  # fmt: skip


def qwen2_config(layers: int = 2) -> Any:
    return transformers.Qwen2Config(
        **QWEN2, num_hidden_layers=layers, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip


@torch.no_grad()
def peaked_lm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough that greedy answers depend on the input (the library's init
    makes nearly constant answers, which would hide a wrong image in the prompt)."""
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 2:
            p.copy_(torch.randn(p.shape, generator=generator) * 1.2 / p.shape[1] ** 0.5)
    return model.eval()


def save_tiny_lm(folder: Path, kind: str, layers: int = 2) -> None:
    """A seeded ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` (``layers`` deep), or an
    ``OPTForCausalLM``, and its tokenizer in ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(llama_config(layers))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(qwen2_config(layers))
    elif kind == "opt":
        model = transformers.OPTForCausalLM(opt_config())
    else:
        raise ValueError(f"kind must be 'llama', 'qwen2' or 'opt', got {kind!r}")
    peaked_lm(model, seed=0).save_pretrained(folder)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="w0", pad_token=f"w{PAD}", eos_token=f"w{EOS}",
        bos_token=f"w{BOS}",
    ).save_pretrained(folder)  # fmt: skip
