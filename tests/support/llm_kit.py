"""The LLM stage's conformance checks (FastV-style reduction at decoder layer K), on the
connector kit's tiny families and feeds (``support.connector_cases``): keep-all equals the
unpatched greedy tokens, remove is exact, batch rows equal single rows, every row keeps
``max(1, ceil(keep * N))`` of its N image tokens from layer K on, accelerate hooks before
and after ``apply``.

Oracles: the unpatched model (keep-all, after ``remove``, under accelerate hooks), single
rows (batch), and the count rule written here against the prompt's image placeholders.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import turbo_adapters as ta
from turbo_adapters.connector.testing import ConnectorCase
from turbo_adapters.families.llava.llm import LLMReduction, cache_state, find_cache
from turbo_adapters.patch import handle_of

__all__ = ["LLM_CHECKS", "LLMCase", "llm_case", "run_llm_check"]


@dataclasses.dataclass
class LLMCase:
    """One family's entry: the connector case's model and feeds, and the layer K.

    Attributes:
        offload: None to run the accelerate check with ``cpu_offload``, else why the
            unpatched model cannot be offloaded (device-alignment hooks then).
    """

    id: str
    build: Callable[[], nn.Module]
    feed: Callable[[list[int]], dict[str, Any]]
    layer: int = 1
    keep: float = 0.5
    batch_rows: tuple[int, ...] = (0, 1, 2)
    new_tokens: int = 4
    offload: str | None = None


def llm_case(case: ConnectorCase, layer: int = 1, offload: str | None = None) -> LLMCase:
    """The LLM case of a connector case (``offload``: a reason of the LLM stage's own why
    the unpatched model cannot run under cpu_offload, else the connector case's)."""
    return LLMCase(
        case.id, case.build, case.feed, layer, batch_rows=case.batch_rows,
        new_tokens=case.new_tokens, offload=offload or case.offload,
    )  # fmt: skip


def _patch(case: LLMCase, model: nn.Module, keep: float, method: str = "prune") -> Any:
    patch = handle_of(model) or ta.apply(model)
    patch.llm = LLMReduction(layer=case.layer, keep=keep, method=method)
    patch.modes = "llm"
    return patch


def _generate(case: LLMCase, model: nn.Module, feed: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            **feed, max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens,
            do_sample=False,
        )  # fmt: skip
    return out[:, feed["input_ids"].shape[1] :]


def _logits(model: nn.Module, feed: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**feed).logits[:, -1]


def _image_token(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "image_token_id", None) or config.image_token_index)


def kept_images(model: nn.Module, feed: dict[str, Any]) -> tuple[list[int], list[int], Any]:
    """One prefill: each row's image placeholders, the image tokens its first reduced
    layer keeps (from the state on the KV cache), and the output."""
    with torch.no_grad():
        out = model(**feed, use_cache=True)
    state = cache_state(find_cache(out))
    assert state is not None, "no LLM-mode state on the cache: nothing was reduced"
    ids = feed["input_ids"]
    valid = feed["attention_mask"].bool() if "attention_mask" in feed else ids != -1
    is_image = (ids == _image_token(model)) & valid
    kept = (is_image.gather(1, state.kept) & state.key_valid).sum(-1)
    return is_image.sum(-1).tolist(), kept.tolist(), out


def check_keep_all_equals_unpatched(case: LLMCase) -> None:
    model = case.build()
    feed = case.feed(list(case.batch_rows))
    ref_tokens, ref_logits = _generate(case, model, feed), _logits(model, feed)
    _patch(case, model, 1.0)
    assert torch.equal(_generate(case, model, feed), ref_tokens)
    torch.testing.assert_close(_logits(model, feed), ref_logits, atol=1e-5, rtol=1e-5)
    images, kept, _ = kept_images(model, feed)
    assert kept == images  # the stage ran, and kept every image token


def check_remove_restores_exactly(case: LLMCase) -> None:
    model = case.build()
    feed = case.feed(list(case.batch_rows))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref_tokens, ref_logits = _generate(case, model, feed), _logits(model, feed)
    dicts = [set(m.__dict__) for m in model.modules()]  # after transformers' first-call hooks
    _patch(case, model, case.keep)
    assert not torch.allclose(_logits(model, feed), ref_logits, atol=1e-6)  # the stage acted
    _generate(case, model, feed)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ta.remove(model)
    assert torch.equal(_logits(model, feed), ref_logits)
    assert torch.equal(_generate(case, model, feed), ref_tokens)
    assert [set(m.__dict__) for m in model.modules()] == dicts
    assert handle_of(model) is None


def check_batch_equals_single(case: LLMCase) -> None:
    model = case.build()
    rows = list(case.batch_rows)
    feed = case.feed(rows)
    for method in ("prune", "merge"):
        _patch(case, model, case.keep, method)
        tokens, logits = _generate(case, model, feed), _logits(model, feed)
        _, counts, _ = kept_images(model, feed)
        for b, row in enumerate(rows):
            one = case.feed([row])
            assert torch.equal(_generate(case, model, one)[0], tokens[b]), (method, row)
            torch.testing.assert_close(_logits(model, one)[0], logits[b], atol=1e-4, rtol=1e-4)
            assert kept_images(model, one)[1] == [counts[b]]


def check_counts_follow_budget(case: LLMCase) -> None:
    model = case.build()
    feed = case.feed(list(case.batch_rows))
    for keep in (case.keep, 0.3, 0.01):
        _patch(case, model, keep)
        images, kept, out = kept_images(model, feed)
        assert kept == [max(1, math.ceil(keep * n - 1e-9)) if n else 0 for n in images], keep
        # layers >= K hold each row's text and kept image tokens, re-laid to the longest row
        valid = feed["attention_mask"].sum(-1).tolist()
        width = max(v - n + k for v, n, k in zip(valid, images, kept, strict=True))
        cache = find_cache(out)
        assert cache.get_seq_length(case.layer) == width
        assert cache.get_seq_length(case.layer - 1) == feed["input_ids"].shape[1]


def _dispatch(case: LLMCase, model: nn.Module) -> None:
    from accelerate import cpu_offload
    from accelerate.hooks import attach_align_device_hook

    if case.offload is None:
        cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        attach_align_device_hook(model, execution_device=torch.device("cpu"))


def _hooks(model: nn.Module) -> dict[str, tuple[Any, Any]]:
    return {
        name: (module._hf_hook, module.__dict__.get("forward"))
        for name, module in model.named_modules()
        if hasattr(module, "_hf_hook")
    }


def check_accelerate_hooks(case: LLMCase) -> None:
    from accelerate.hooks import remove_hook_from_submodules

    feed = case.feed(list(case.batch_rows))
    model = case.build()
    ref_tokens, ref = _generate(case, model, feed), _logits(model, feed)
    _patch(case, model, case.keep)
    want_tokens, want_logits = _generate(case, model, feed), _logits(model, feed)
    want_kept = kept_images(model, feed)[1]
    ta.remove(model)
    for hooks_first in (True, False):
        model = case.build()
        if hooks_first:
            _dispatch(case, model)
            hooks = _hooks(model)
            _patch(case, model, case.keep)
        else:
            _patch(case, model, case.keep)
            _dispatch(case, model)
            hooks = _hooks(model)
        assert hooks
        torch.testing.assert_close(_logits(model, feed), want_logits, atol=1e-6, rtol=1e-6)
        assert torch.equal(_generate(case, model, feed), want_tokens)
        assert kept_images(model, feed)[1] == want_kept
        ta.remove(model)
        assert _hooks(model) == hooks
        torch.testing.assert_close(_logits(model, feed), ref, atol=1e-6, rtol=1e-6)
        assert torch.equal(_generate(case, model, feed), ref_tokens)
        remove_hook_from_submodules(model)


LLM_CHECKS: dict[str, Callable[[LLMCase], None]] = {
    "keep_all_equals_unpatched": check_keep_all_equals_unpatched,
    "remove_restores_exactly": check_remove_restores_exactly,
    "batch_equals_single": check_batch_equals_single,
    "counts_follow_budget": check_counts_follow_budget,
    "accelerate_hooks": check_accelerate_hooks,
}


def run_llm_check(case: LLMCase, name: str) -> None:
    if name not in LLM_CHECKS:
        raise ValueError(f"check must be one of {sorted(LLM_CHECKS)}, got {name!r}")
    LLM_CHECKS[name](case)
