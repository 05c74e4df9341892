"""``log(size)`` in the language model after a connector merge on LLaVA-OneVision,
Idefics3 / SmolVLM, InternVL (causal decoders) and PaliGemma, Gemma 3 (prefix-LM masks with
bidirectional image blocks; Gemma 3's sliding-window layers): the patched model equals the
unpatched one fed the shortened prompt, the method's tokens and an explicit additive mask
with ``log(size)`` on each image key (logits and greedy tokens). LLaVA and Qwen-VL have
theirs in test_connector.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from support import connector_cases as cc
from support import connector_methods as cm
from support import size_bias_oracle as sbo
from support import tiny_prefix_vlms as tp

import turbo_adapters as ta
from turbo_adapters.connector import ConnectorReduction, last_connector

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 4
ROWS = [0, 1, 2]


def _gemma3_window() -> int:
    return int(tp.build_gemma3().config.text_config.sliding_window)


# (case, masks of the oracle, the token type generate gives new tokens)
FAMILIES = [
    (cc.ONEVISION, sbo.causal_masks, 0),
    (cc.IDEFICS3, sbo.causal_masks, 0),
    (cc.SMOLVLM, sbo.causal_masks, 0),
    (cc.INTERNVL, sbo.causal_masks, 0),
    (cc.PALIGEMMA, sbo.paligemma_masks, 1),  # the suffix (generated) is causal: type 1
    (cc.GEMMA3, sbo.gemma3_masks(16), 0),
]


@pytest.mark.parametrize(("case", "masks", "new_type"), FAMILIES, ids=[f[0].id for f in FAMILIES])
def test_size_bias_equals_the_unpatched_model_with_an_explicit_bias(case, masks, new_type) -> None:
    model = case.build()
    feed = case.feed(ROWS)
    tokens = case.tokens(ROWS)
    call, sizes = sbo.shortened_call(model, feed, tokens, case.budget, tp.IMG)
    assert max(sizes) > 1
    logs = sbo.key_logs(call["input_ids"], tp.IMG, sizes)
    with torch.no_grad():
        want_logits = model(**{**call, "attention_mask": masks(
            call["attention_mask"], logs, call.get("token_type_ids"))}).logits  # fmt: skip
        plain = model(**call).logits
    want = sbo.greedy_with_bias(model, call, sizes, tp.IMG, NEW, masks, new_type)
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=case.budget, method=cm.STRIDED)  # default bias
    with torch.no_grad():
        got_logits = model(**feed).logits
        got = model.generate(**feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert [float(s) for kept in last_connector(patch).sizes for s in kept] == sizes
    valid = call["attention_mask"].bool()
    torch.testing.assert_close(got_logits[valid], want_logits[valid], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain[valid], want_logits[valid], atol=1e-3)  # the bias matters
    assert torch.equal(got[:, feed["input_ids"].shape[1] :], want)
    # and without it: the plain shortened prompt
    patch.connector = ConnectorReduction(budget=case.budget, method=cm.STRIDED, size_bias=False)
    with torch.no_grad():
        off = model(**feed).logits
    torch.testing.assert_close(off[valid], plain[valid], atol=1e-5, rtol=1e-5)


def test_gemma3_prompt_outgrows_its_sliding_window() -> None:
    """The Gemma 3 case above is only a check of the sliding-window keys if a shortened
    prompt (plus the new tokens) is longer than the window."""
    model = cc.GEMMA3.build()
    call, _ = sbo.shortened_call(
        model, cc.GEMMA3.feed(ROWS), cc.GEMMA3.tokens(ROWS), cc.GEMMA3.budget, tp.IMG
    )
    window = _gemma3_window()
    assert window == 16
    assert int(call["attention_mask"].sum(-1).max()) > window
    layer_types = model.config.text_config.layer_types
    assert "sliding_attention" in layer_types


@pytest.mark.parametrize(
    ("case", "masks"),
    [(cc.GEMMA3, sbo.gemma3_masks(16)), (cc.INTERNVL, sbo.causal_masks)],
    ids=["gemma3", "internvl"],
)
def test_size_bias_with_a_static_cache(case, masks) -> None:
    """generate's static cache (Gemma 3: sliding layers that roll over the window) hands
    the decoder a mask per layer type; the bias follows the keys the cache holds."""
    model = case.build()
    feed = case.feed(ROWS)
    call, sizes = sbo.shortened_call(model, feed, case.tokens(ROWS), case.budget, tp.IMG)
    steps = 6  # Gemma 3's longest row then passes its 16-token window while decoding
    want = sbo.greedy_with_bias(model, call, sizes, tp.IMG, steps, masks)
    ta.apply(model).connector = ConnectorReduction(budget=case.budget, method=cm.STRIDED)
    with torch.no_grad():
        got = model.generate(
            **feed, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            cache_implementation="static",
        )  # fmt: skip
    assert torch.equal(got[:, feed["input_ids"].shape[1] :], want)
