"""Connector guides without a CLS token: the SigLIP pooling head's probe attention, the
mean query and the prompt's attention, each against a float64 oracle written from its
definition (the probe's from ``nn.MultiheadAttention``'s own returned weights); the
family defaults, the refusals, and VisionZip running on Qwen2.5-VL and PaliGemma."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from support import connector_cases as cc
from support import tiny_prefix_vlms as tp
from support import tiny_qwen_vl as tq

import turbo_adapters as ta
from turbo_adapters.connector import ConnectorReduction, last_connector
from turbo_adapters.connector.guides import mean_query_guide, probe_guide, text_guide
from turbo_core.connector import CONNECTOR_METHODS, ConnectorInputs, register_connector_method
from turbo_core.selection import VisionZip

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ oracles (float64)
def _mean_oracle(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    n, d = x.shape
    m = [sum(x[i, c].item() for i in range(n)) / n for c in range(d)]
    logits = [sum(m[c] * x[i, c].item() for c in range(d)) / math.sqrt(d) for i in range(n)]
    top = max(logits)
    e = [math.exp(v - top) for v in logits]
    return torch.tensor([v / sum(e) for v in e], dtype=torch.float64)


def _text_oracle(x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    x, text = x.double(), text.double()
    rows = [(x @ t / math.sqrt(x.shape[1])).softmax(0) for t in text]
    return torch.stack(rows).mean(0)


def _probe_oracle(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The head's nn.MultiheadAttention asked for its own (head-averaged) weights, float64."""
    attn = head.attention.double()
    try:
        probe = head.probe.double().expand(hidden.shape[0], -1, -1)
        h = hidden.double()
        with torch.no_grad():
            _, weights = attn(probe, h, h, need_weights=True, average_attn_weights=True)
    finally:
        head.attention.float()
    return weights[:, 0]  # (B, N)


def _siglip_head(seed: int = 0) -> torch.nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(**tp._siglip())
    return SiglipVisionModel(config).eval().head


# ------------------------------------------------------------------ the guides themselves
def test_probe_guide_equals_the_heads_own_attention_weights() -> None:
    head = _siglip_head()
    hidden = torch.randn(3, 20, 32, generator=torch.Generator().manual_seed(1)) * 2
    got = probe_guide(head, hidden)
    want = _probe_oracle(head, hidden)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(want, torch.full_like(want, 1 / 20), atol=1e-3)  # not uniform


def test_mean_and_text_guides_equal_their_definitions() -> None:
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(12, 8, generator=g) * 3, torch.randn(5, 8, generator=g) * 3
    torch.testing.assert_close(mean_query_guide(x).double(), _mean_oracle(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        text_guide(x, text).double(), _text_oracle(x, text), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(text_guide(x, text[:0]), torch.full((12,), 1 / 12))


def test_bad_guide_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="guide must be one of auto, none, cls, probe"):
        ConnectorReduction(guide="clss")


# ------------------------------------------------------------------ per family, recorded
def _recorded(model, feed, settings: ConnectorReduction) -> list[ConnectorInputs]:
    seen: list[ConnectorInputs] = []

    def record(inputs: ConnectorInputs, budget: int):
        seen.append(inputs)
        return CONNECTOR_METHODS["divprune"](inputs, budget)

    register_connector_method("test-guide-record", record, replace=True)
    try:
        patch = ta.apply(model)
        patch.modes = "connector"
        patch.connector = ConnectorReduction(
            budget=settings.budget, method="test-guide-record", guide=settings.guide
        )
        with torch.no_grad():
            model(**feed)
        patch.remove()
    finally:
        CONNECTOR_METHODS.pop("test-guide-record", None)
    return seen


def _flat_guides(seen: list[ConnectorInputs]) -> list[torch.Tensor]:
    return [g for inputs in seen for g in inputs.guide]


@pytest.mark.parametrize("guide", ["auto", "probe"])
def test_paligemma_probe_guide_is_the_pooling_heads_attention(guide) -> None:
    model = tp.build_paligemma()
    feed = tp.paligemma_feed([0, 1])
    with torch.no_grad():
        hidden = model.model.vision_tower(feed["pixel_values"]).last_hidden_state
    want = _probe_oracle(model.model.vision_tower.head, hidden)
    seen = _recorded(model, feed, ConnectorReduction(budget=5, guide=guide))
    got = torch.stack(_flat_guides(seen))
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_gemma3_probe_guide_is_summed_over_the_average_pool() -> None:
    model = tp.build_gemma3()
    feed = tp.gemma3_feed([0, 1])
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values=feed["pixel_values"]).last_hidden_state
    patches = _probe_oracle(model.model.vision_tower.head, hidden)  # (B, 64)
    side, k = 8, 2  # 32 px / 4 px patches, pooled to 4x4 = 16 tokens
    want = torch.zeros(patches.shape[0], 16, dtype=torch.float64)
    for b in range(patches.shape[0]):
        for r in range(side):
            for c in range(side):
                want[b, (r // k) * (side // k) + c // k] += patches[b, r * side + c]
    seen = _recorded(model, feed, ConnectorReduction(budget=5))
    got = torch.stack(_flat_guides(seen))
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_probe_is_refused_where_the_tower_has_no_head() -> None:
    model = tp.build_paligemma()
    model.model.vision_tower.use_head = False
    del model.model.vision_tower.head
    feed = tp.paligemma_feed([0])
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=5, method="divprune", guide="probe")
    with (
        pytest.raises(ValueError, match="guide='probe' is not available on paligemma"),
        torch.no_grad(),
    ):
        model(**feed)
    patch.connector = ConnectorReduction(budget=5, method="visionzip")  # auto: mean
    with torch.no_grad():
        model(**feed)
    assert last_connector(patch).tokens_out == (5,)


@pytest.mark.parametrize("guide", ["auto", "mean", "text"])
def test_qwen_guides_equal_their_oracles(guide) -> None:
    model = tq.build("qwen2_5_vl")
    rows = [0, 1]
    feed = cc.qwen_feed(rows)
    with torch.no_grad():
        features = model.model.get_image_features(
            feed["pixel_values"], feed["image_grid_thw"], return_dict=True
        ).pooler_output
    embed = model.get_input_embeddings()
    texts = []
    for r in range(len(rows)):
        ids = feed["input_ids"][r][feed["attention_mask"][r].bool()]
        with torch.no_grad():
            texts.append(embed(ids[ids != tq.IMG]))
    image_rows = [r for r, row in enumerate(rows) for _ in cc.QWEN_GRIDS[row]]
    if guide == "text":
        want = [_text_oracle(f, texts[r]) for f, r in zip(features, image_rows, strict=True)]
    else:
        want = [_mean_oracle(f) for f in features]
    seen = _recorded(model, feed, ConnectorReduction(budget=3, guide=guide))
    got = sorted(_flat_guides(seen), key=len)
    want = sorted((w for w in want if len(w) > 3), key=len)  # budget 3: smaller ones kept
    assert len(got) == len(want) == 2
    for w in want:
        assert any(g.shape == w.shape and torch.allclose(g.double(), w, atol=1e-6) for g in got), (
            "a recorded guide differs from its oracle"
        )


def test_qwen_refuses_guides_it_lacks() -> None:
    model = tq.build("qwen2_5_vl")
    patch = ta.apply(model)
    for name in ("probe", "cls"):
        patch.connector = ConnectorReduction(budget=3, method="visionzip", guide=name)
        with pytest.raises(ValueError, match=f"guide='{name}' is not available"), torch.no_grad():
            model(**cc.qwen_feed([0]))


# ------------------------------------------------------------------ VisionZip end to end
def test_visionzip_runs_on_qwen25_vl_with_the_mean_guide() -> None:
    model = tq.build("qwen2_5_vl")
    feed = cc.qwen_feed([0, 2])  # one image per row: 4 and 6 tokens
    with torch.no_grad():
        features = model.model.get_image_features(
            feed["pixel_values"], feed["image_grid_thw"], return_dict=True
        ).pooler_output
    want = [
        VisionZip()(ConnectorInputs(f[None], guide=_mean_oracle(f).float()[None]), 3)
        for f in features
    ]
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=3, method="visionzip")
    with torch.no_grad():
        logits = model(**feed).logits
        out = model.generate(**feed, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    record = last_connector(patch)
    assert record.tokens_out == (3, 3)
    for j in range(2):
        assert torch.equal(record.index[j], want[j].index[0])
        torch.testing.assert_close(record.sizes[j], want[j].sizes[0])
    assert torch.isfinite(logits).all() and out.shape[1] == feed["input_ids"].shape[1] + 3
    patch.connector = ConnectorReduction(budget=3, method="visionzip", guide="none")
    with pytest.raises(ValueError, match="visionzip needs a guide"), torch.no_grad():
        model(**feed)


def test_visionzip_runs_on_paligemma_with_the_probe_guide() -> None:
    model = tp.build_paligemma()
    feed = tp.paligemma_feed([0, 1])
    with torch.no_grad():
        output = model.model.get_image_features(feed["pixel_values"], return_dict=True)
    guide = _probe_oracle(model.model.vision_tower.head, output.last_hidden_state)
    want = VisionZip()(ConnectorInputs(output.pooler_output, guide=guide.float()), 12)
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=12, method="visionzip")
    with torch.no_grad():
        model(**feed)
        out = model.generate(**feed, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    record = last_connector(patch)
    assert record.tokens_out == (12, 12)
    for j in range(2):
        assert torch.equal(record.index[j], want.index[j])
        torch.testing.assert_close(record.sizes[j], want.sizes[j])
    assert out.shape[1] == feed["input_ids"].shape[1] + 3


# ------------------------------------------------------------------ LLaVA
def test_llava_mean_guide_replaces_the_cls_row_when_asked() -> None:
    from support import tiny_llava as tl

    model = tl.build()
    feed = cc.llava_feed([0])
    with torch.no_grad():
        features = model.model.get_image_features(
            feed["pixel_values"], return_dict=True
        ).pooler_output
    seen = _recorded(model, feed, ConnectorReduction(budget=5, guide="mean"))
    (got,) = _flat_guides(seen)
    torch.testing.assert_close(got.double(), _mean_oracle(features[0]), atol=1e-6, rtol=0)
    assert seen[0].keys is not None  # the CLIP layer's keys are still read


def test_llava_next_refuses_cls_and_defaults_to_mean() -> None:
    model = cc.build_next()
    feed = cc.next_feed([2])
    patch = ta.apply(model)
    patch.modes = "connector"
    patch.connector = ConnectorReduction(budget=7, method="visionzip", guide="cls")
    with pytest.raises(ValueError, match="guide='cls' is not available on llava"), torch.no_grad():
        model(**feed)
    patch.connector = ConnectorReduction(budget=7, method="visionzip")
    with torch.no_grad():
        model(**feed)
    assert last_connector(patch).tokens_out == (7,)
