"""GPTQ for the language model of a vision-language stack, with gptqmodel (7.6 and 7.7).

Turbo reduces the vision tokens; GPTQ makes the language model that reads them
cheaper. The two meet only at the language model's ``inputs_embeds``, so stacking
needs no more than: quantize the language model (a saved transformers causal LM with
its tokenizer, :func:`quantize_gptq`), load it back (:func:`load_gptq`), put it where
the VLM's language model was (:func:`attach_gptq`; Qwen2-VL and Qwen2.5-VL keep their
own M-RoPE text model, which takes the quantized layers), and patch the model with
``turbo_adapters.apply`` or ``apply_vlm_method``.

gptqmodel pins numpy and torch and needs ``GPTQMODEL_CPU_WORKERS`` on small machines:
install it in its own environment (``pip install 'turbo-adapters[gptq]'``; tox ``gptq``).
"""

from __future__ import annotations

import copy as _copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["attach_gptq", "gptq_linear_classes", "language_model_of", "load_gptq", "quantize_gptq"]

MISSING = (
    "GPTQ needs the gptqmodel package (gptqmodel>=7.6; tested 7.6.0 and 7.7.0), whose "
    "numpy and torch pins differ from the other environments', so it lives in its own "
    "environment: pip install 'turbo-adapters[gptq]', or run the tests with "
    "python -m tox -e gptq"
)


def _workers() -> None:
    # gptqmodel starts one worker per core by default (2 cores here are shared with torch);
    # 7.7 loads models with a pool of 2 workers and refuses a parent pool of 1, so 2 is
    # also the floor on a 1-core machine
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def _gptqmodel() -> Any:
    """The gptqmodel module, or a ModuleNotFoundError that says where to get it."""
    _workers()
    try:
        import gptqmodel
    except ModuleNotFoundError as error:
        if error.name != "gptqmodel":
            raise
        raise ModuleNotFoundError(MISSING, name="gptqmodel") from error
    return gptqmodel


def quantize_gptq(
    pretrained: str | Path,
    out: str | Path,
    calibration: Sequence[torch.Tensor],
    *,
    bits: int = 4,
    group_size: int = 128,
    device: str = "cpu",
) -> Path:
    """GPTQ-quantize the causal LM saved at ``pretrained`` (with its tokenizer) into ``out``.

    Args:
        calibration: token id tensors ``(1, L)`` or ``(L,)``, at least 10 tokens each.
        bits: 2, 3, 4 or 8.
        group_size: a divisor of every quantized layer's input width, or -1 (per row).

    Returns:
        ``out``, loadable with :func:`load_gptq`.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits!r}")
    if not calibration:
        raise ValueError("calibration must hold at least one token sequence")
    gptqmodel = _gptqmodel()
    rows = []
    for ids in calibration:
        ids = ids.reshape(1, -1).long()
        if ids.shape[1] < 10:
            raise ValueError(f"calibration sequences need >= 10 tokens, got {ids.shape[1]}")
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    config = gptqmodel.QuantizeConfig(bits=bits, group_size=group_size)
    model = gptqmodel.GPTQModel.load(str(pretrained), config, device=device)
    model.quantize(rows, batch_size=1)
    model.save(str(out))
    return Path(out)


def load_gptq(path: str | Path, device: str = "cpu") -> nn.Module:
    """The quantized transformers model (e.g. ``LlamaForCausalLM``) saved at ``path``.

    gptqmodel loads it in bfloat16 on the CPU (its CPU kernels take fp16/bf16) and sets
    ``do_sample=True`` in its generation config: pass ``do_sample=False`` for greedy.
    """
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no GPTQ model folder at {path}")
    wrapper: Any = _gptqmodel().GPTQModel.load(str(path), device=device)
    return wrapper.model.eval()  # type: ignore[no-any-return]


def gptq_linear_classes(model: nn.Module) -> set[str]:
    """Names of the gptqmodel quantized Linear classes inside ``model``."""
    return {
        type(m).__name__ for m in model.modules() if type(m).__module__.startswith("gptqmodel.")
    }


# ------------------------------------------------- where a VLM keeps its language model
def _is_causal_lm(module: Any) -> bool:
    return (
        isinstance(module, nn.Module)
        and hasattr(module, "get_output_embeddings")
        and module.get_output_embeddings() is not None
    )


def _is_peft(module: Any) -> bool:
    return type(module).__module__.startswith("peft.") and hasattr(module, "peft_config")


def language_model_of(model: nn.Module) -> tuple[str, nn.Module]:
    """How ``model`` holds its language model, and that model.

    Returns:
        ``(kind, module)``: ``"whole"`` (``model`` is a causal LM), ``"causal"``
        (``model.language_model`` is a causal LM: BLIP-2, InstructBLIP), ``"base+head"``
        (``model.model.language_model`` and ``model.lm_head``: transformers 5 LLaVA,
        LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL; the module returned is the base model) or ``"peft"``
        (``model.llama_model`` is a peft model: MiniGPT-v2 with LoRA).

    Raises:
        TypeError: for a model with none of these.
    """
    slot = getattr(model, "language_model", None)
    if _is_causal_lm(slot):
        return "causal", slot
    inner = getattr(model, "model", None)
    base = getattr(inner, "language_model", None)
    if isinstance(base, nn.Module) and isinstance(getattr(model, "lm_head", None), nn.Module):
        return "base+head", base
    if _is_peft(getattr(model, "llama_model", None)):
        return "peft", model.llama_model
    if _is_causal_lm(model) and getattr(model, "config", None) is not None:
        return "whole", model
    raise TypeError(
        f"cannot find the language model of {type(model).__name__}: expected a causal LM, "
        "a .language_model causal LM (BLIP-2), .model.language_model with .lm_head (LLaVA) "
        "or a peft .llama_model (MiniGPT-v2)"
    )


def _text_config(model: nn.Module, kind: str, lm: nn.Module) -> Any:
    if kind == "base+head":
        config = getattr(model, "config", None)
        return getattr(config, "text_config", None) or lm.config
    return lm.config


def _check_fits(
    dense: Any, quantized: Any, fields: Sequence[str] = ("hidden_size", "vocab_size")
) -> None:
    for field in fields:
        want, got = getattr(dense, field, None), getattr(quantized, field, None)
        if want is not None and got is not None and want != got:
            raise ValueError(
                f"the GPTQ model has {field}={got}, the model's language model {field}={want}: "
                "quantize that language model (the same config and weights)"
            )


#: what a VLM's own text model and the quantized decoder must agree on to share layers
_SHAPE_FIELDS = (
    "hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim",
)  # fmt: skip


def _transplant(lm: nn.Module, base: nn.Module, dense_config: Any, quantized_config: Any) -> None:
    """Put the quantized base model ``base``'s parts into ``lm``, a VLM's text model of
    another class (Qwen2-VL's and Qwen2.5-VL's, whose rotary embedding computes M-RoPE's
    3-D positions, which a plain ``Qwen2Model`` cannot take).

    Each child of ``lm`` that holds weights (embeddings, decoder layers, final norm) is
    replaced by ``base``'s child of that name; the weight-free ones (the rotary
    embedding) stay, and so does ``lm.forward``.

    Raises:
        ValueError: when the shapes differ. TypeError: when ``base`` lacks such a child.
    """
    _check_fits(dense_config, quantized_config, _SHAPE_FIELDS)
    parts = {}
    for name, child in lm.named_children():
        if next(child.parameters(), None) is None:
            continue
        part = getattr(base, name, None)
        if not isinstance(part, nn.Module):
            raise TypeError(
                f"the GPTQ model's {type(base).__name__} has no {name}, which "
                f"{type(lm).__name__} holds: quantize that language model"
            )
        if isinstance(child, nn.ModuleList) and len(child) != len(part):
            raise ValueError(
                f"the GPTQ model has {len(part)} {name}, the model's language model "
                f"{len(child)}: quantize that language model"
            )
        parts[name] = part
    for name, part in parts.items():  # all checked first: a refusal changes nothing
        setattr(lm, name, part)


def _copy_sharing(model: nn.Module, *keep: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose ``keep`` parts share tensors with the original (they
    are about to be replaced, so copying their weights would only cost memory)."""
    memo: dict[int, Any] = {}
    for part in keep:
        memo.update({id(t): t for t in (*part.parameters(), *part.buffers())})
    return _copy.deepcopy(model, memo)


def attach_gptq(model: nn.Module, quantized: nn.Module, *, copy: bool = False) -> nn.Module:
    """Put the GPTQ causal LM ``quantized`` where ``model``'s language model is.

    Args:
        model: a causal LM, or a VLM that :func:`language_model_of` understands.
        quantized: from :func:`load_gptq`: the same language model, quantized.
        copy: leave ``model`` as it is and return a copy (the dense language model's
            weights are not copied).

    Returns:
        the model holding ``quantized`` (``quantized`` itself when ``model`` is a causal
        LM). For MiniGPT-v2, ``quantized`` gets the dense model's LoRA (same config and
        weights, through peft) around its GPTQ layers. Where the VLM's text model is a
        class of its own (Qwen2-VL and Qwen2.5-VL: M-RoPE positions; quantize a
        ``Qwen2ForCausalLM`` of the same shapes), it stays and receives ``quantized``'s
        embeddings, decoder layers and norm; its rotary embedding and forward stay.

    Raises:
        TypeError: when no language model is found. ValueError: when the widths differ
            (for a text model of its own: any of the layer count, heads and head width).
    """
    kind, lm = language_model_of(model)
    _check_fits(_text_config(model, kind, lm), quantized.config)
    if kind == "whole":
        return quantized
    parts = (lm, model.lm_head) if kind == "base+head" else (lm,)
    target = _copy_sharing(model, *parts) if copy else model
    kind, lm = language_model_of(target)
    if kind == "causal":
        target.language_model = quantized
    elif kind == "base+head":
        base = quantized.base_model
        if type(lm) is type(base):
            target.model.language_model = base
        else:  # the VLM's own text model (Qwen-VL: M-RoPE positions) keeps its forward
            _transplant(lm, base, _text_config(model, kind, lm), quantized.config)
        target.lm_head = quantized.get_output_embeddings()
    else:
        target.llama_model = _with_lora_of(lm, quantized)
    return target


def _with_lora_of(dense: Any, quantized: nn.Module) -> nn.Module:
    """``quantized`` wrapped by peft with ``dense``'s adapter config and weights."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    name = getattr(dense, "active_adapter", "default")
    weights = get_peft_model_state_dict(dense, adapter_name=name)
    wrapped = get_peft_model(quantized, _copy.deepcopy(dense.peft_config[name]), adapter_name=name)
    result = set_peft_model_state_dict(wrapped, weights, adapter_name=name)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"the LoRA weights did not fit the GPTQ model: missing {missing[:4]}, "
            f"unexpected {list(result.unexpected_keys)[:4]}"
        )
    return wrapped
