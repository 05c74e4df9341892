"""The VLM methods by name (``apply_vlm_method``) on Qwen2.5-VL and Qwen2-VL whose Qwen2
decoder is GPTQ-quantized.

The tiny 4-layer ``Qwen2ForCausalLM`` is quantized once per session (conftest) and
attached with ``attach_gptq``, which keeps the VLM's own text model (its M-RoPE
positions) and puts the quantized embeddings, decoder layers and norm into it. Images
have their own sizes (dynamic resolution), so each row has its own image token count.
Oracles: the quantized ``Qwen2ForCausalLM`` itself on a text-only prompt (M-RoPE with
equal t, h, w positions is RoPE: identical logits); the same quantized VLM unpatched
(keeping every token: identical greedy ids, logits to 1e-5); each method's budget rule
written here from its paper (the connector's count per image; FastV's cut; PyramidDrop's
powers; SparseVLM's counts plus its recycled clusters) against the sequence length each
quantized decoder layer receives; the reasons Qwen gives for what it refuses (Turbo's
tower stage by method name, an LLM-mode budget in tokens); and the tower stage
(``patch.modes = "tower"``) on the quantized stack.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from probes import answer, layer_lengths, sparse_counts  # noqa: E402
from support import tiny_qwen_vl as tq  # noqa: E402
from tiny_lm import QWEN2  # noqa: E402

import turbo_adapters as ta  # noqa: E402
from turbo_adapters import VLM_METHODS, apply_vlm_method  # noqa: E402
from turbo_adapters.compose import gptq  # noqa: E402
from turbo_adapters.connector import last_connector  # noqa: E402
from turbo_adapters.families.llava.llm import LLMReduction  # noqa: E402
from turbo_adapters.families.qwen_vl import QwenTowerReduction  # noqa: E402

KINDS = ("qwen2_5_vl", "qwen2_vl")
NEW = 4
DEPTH = 4
#: a batch of 2: one image of 8 tokens; images of 4 and 16 tokens (left padded)
GRIDS = [[(1, 4, 8)], [(1, 4, 4), (1, 8, 8)]]
#: the budget row: two images, 8 and 16 tokens
ROW = [[(1, 4, 8), (1, 8, 8)]]
PER_IMAGE = [tq.tokens(g) for g in ROW[0]]
IMAGE_TOKENS = sum(PER_IMAGE)
#: every (method, stage) the library offers by name
RUNS = [(m, s) for m, stages in VLM_METHODS.items() for s in stages]


def _vision(kind: str) -> dict[str, Any]:
    """The tiny towers of ``support.tiny_qwen_vl``, merging into the decoder's width."""
    common = {"depth": 3, "num_heads": 2, "patch_size": tq.PATCH,
              "temporal_patch_size": tq.TEMPORAL, "spatial_merge_size": tq.MERGE,
              "in_channels": 3, "initializer_range": 0.2}  # fmt: skip
    if kind == "qwen2_vl":
        return {**common, "embed_dim": 16, "hidden_size": QWEN2["hidden_size"], "mlp_ratio": 2}
    return {**common, "hidden_size": 16, "intermediate_size": 32,
            "out_hidden_size": QWEN2["hidden_size"], "window_size": 16,
            "fullatt_block_indexes": [1]}  # fmt: skip


NAMES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
}


def dense_qwen_vl(kind: str, layers: int = DEPTH) -> nn.Module:
    """The tiny VLM before the GPTQ decoder goes in (seeded: the same tower every time)."""
    config_cls, model_cls = (getattr(transformers, n) for n in NAMES[kind])
    text = {
        **QWEN2, "num_hidden_layers": layers, "pad_token_id": tq.PAD,
        # M-RoPE: the head's 8 frequencies split 2 / 3 / 3 over (t, h, w)
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": [2, 3, 3]},
    }  # fmt: skip
    config = config_cls(
        text_config=text, vision_config=_vision(kind), image_token_id=tq.IMG,
        video_token_id=tq.VIDEO, vision_start_token_id=tq.START, vision_end_token_id=tq.END,
    )  # fmt: skip
    torch.manual_seed(0)
    return model_cls(config).eval()


def qwen_vl(kind: str, folder: Path, layers: int = DEPTH) -> nn.Module:
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` or ``Qwen2VLForConditionalGeneration``
    whose text model holds the GPTQ ``Qwen2ForCausalLM``'s layers."""
    model = dense_qwen_vl(kind, layers)
    text_model = model.model.language_model
    gptq.attach_gptq(model, gptq.load_gptq(folder))
    assert model.model.language_model is text_model  # its M-RoPE text model stays
    assert gptq.gptq_linear_classes(text_model)
    model.generation_config.pad_token_id = tq.PAD
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module", params=KINDS)
def model(request: pytest.FixtureRequest, quantized_qwen2_folder: Path) -> nn.Module:
    return qwen_vl(request.param, quantized_qwen2_folder)


@pytest.fixture(scope="module")
def reference(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized model unpatched: greedy answers and last logits of the batch of 2."""
    inputs = tq.feed(GRIDS)
    tokens = answer(model, inputs)
    assert len(set(tokens.flatten().tolist())) > 2  # answers depend on the input
    return {"tokens": tokens, "logits": layer_lengths(model, inputs)[1]}


def test_the_text_model_runs_the_quantized_qwen2(model, quantized_qwen2_folder) -> None:
    """On text alone M-RoPE's three position rows are equal, which is Qwen2's RoPE: the
    VLM gives the quantized ``Qwen2ForCausalLM``'s logits exactly."""
    qwen2 = gptq.load_gptq(quantized_qwen2_folder)
    assert type(qwen2).__name__ == "Qwen2ForCausalLM"
    ids = torch.tensor([[1, 5, 6, 40, 8, 9, 10, 77, 12]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, qwen2(input_ids=ids).logits, atol=0, rtol=0
        )
    text_model = model.model.language_model
    assert "VL" in type(text_model).__name__ and "VL" in type(text_model.rotary_emb).__name__
    assert [type(layer).__name__ for layer in text_model.layers] == ["Qwen2DecoderLayer"] * DEPTH


def test_attach_with_copy_leaves_the_dense_model(model, quantized_qwen2_folder) -> None:
    """``copy=True`` (turbo-eval's gptq side): a second VLM holds the quantized layers in a
    text model of its own; the dense one keeps its layers and its logits."""
    dense = dense_qwen_vl(model.config.model_type)
    parts = dict(dense.model.language_model.named_children())
    inputs = tq.feed(GRIDS)
    with torch.no_grad():
        before = dense(**inputs).logits
        stacked = gptq.attach_gptq(dense, gptq.load_gptq(quantized_qwen2_folder), copy=True)
        assert torch.equal(dense(**inputs).logits, before)
        torch.testing.assert_close(stacked(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    assert dict(dense.model.language_model.named_children()) == parts
    assert not gptq.gptq_linear_classes(dense)
    assert stacked.model.language_model is not dense.model.language_model
    assert type(stacked.model.language_model) is type(dense.model.language_model)


def test_attach_refuses_another_decoder_and_changes_nothing(
    quantized_qwen2_folder, quantized_opt_folder
) -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "the GPTQ model has num_hidden_layers=4, the model's language model "
            "num_hidden_layers=3: quantize that language model"
        ),
    ):
        qwen_vl("qwen2_5_vl", quantized_qwen2_folder, layers=3)
    # a 2-layer OPT has the widths, not the parts: refused before anything moved
    dense = dense_qwen_vl("qwen2_5_vl", layers=2)
    parts = dict(dense.model.language_model.named_children())
    head = dense.lm_head
    with pytest.raises(
        TypeError,
        match=re.escape(
            "the GPTQ model's OPTModel has no embed_tokens, which Qwen2_5_VLTextModel holds: "
            "quantize that language model"
        ),
    ):
        gptq.attach_gptq(dense, gptq.load_gptq(quantized_opt_folder))
    assert dict(dense.model.language_model.named_children()) == parts
    assert dense.lm_head is head and not gptq.gptq_linear_classes(dense)


@pytest.mark.parametrize(("method", "stage"), RUNS)
def test_keeping_every_token_equals_the_quantized_model(model, reference, method, stage) -> None:
    inputs = tq.feed(GRIDS)
    patch = apply_vlm_method(model, method, stage=stage, budget=1.0)
    if method == "sparsevlm":  # its later stages scale (66, 30, 17): all tokens at every stage
        patch.llm = LLMReduction.sparse_vlm(
            counts=(IMAGE_TOKENS,) * 3,
            layers=[layer for layer, _ in patch.llm.schedule],
            image_tokens=IMAGE_TOKENS,
        )
    try:
        assert torch.equal(answer(model, inputs), reference["tokens"])
        lengths, logits = layer_lengths(model, inputs)
        torch.testing.assert_close(logits, reference["logits"], atol=1e-5, rtol=1e-5)
        # nothing was cut: every layer holds the longest row whole (LLM mode drops padding)
        assert min(lengths) >= int(inputs["attention_mask"].sum(-1).max())
        if stage == "connector":
            record = last_connector(patch)
            assert record.tokens_out == record.tokens_in == (8, 4, 16)
        assert gptq.gptq_linear_classes(model.model.language_model)  # still the GPTQ layers
    finally:
        patch.remove()
    assert ta.handle_of(model) is None


@pytest.mark.parametrize(
    ("method", "stage", "budget"),
    [("fastv", "llm", 0.5), ("turbo", "llm", 0.5), ("pyramiddrop", "llm", 0.5),
     ("sparsevlm", "llm", 0.5), ("divprune", "connector", 5), ("visionzip", "connector", 6),
     ("cdpruner", "connector", 0.25), ("turbo", "connector", 3)],
)  # fmt: skip
def test_budgets_are_exact_in_the_quantized_decoder(model, method, stage, budget) -> None:
    inputs = tq.feed(ROW)
    text = int((inputs["input_ids"][0] != tq.IMG).sum())
    full = text + IMAGE_TOKENS
    plain, plain_logits = layer_lengths(model, inputs)
    assert plain == [full] * DEPTH
    patch = apply_vlm_method(model, method, stage=stage, budget=budget)
    try:
        lengths, logits = layer_lengths(model, inputs)
        # LLM mode: the row's image tokens (both images) are ranked together
        if method in ("fastv", "turbo") and stage == "llm":  # FastV's K = 2
            assert lengths == [full, full, text + 12, text + 12]
        elif method == "pyramiddrop":  # at layers 1, 2, 3 keep 0.5, 0.25, 0.125 of 24
            counts = [math.ceil(budget ** (s + 1) * IMAGE_TOKENS - 1e-9) for s in range(3)]
            assert counts == [12, 6, 3]
            assert lengths == [full, *[text + c for c in counts]]
        elif method == "sparsevlm":  # raters at layers 0, 1, 2 (3/32, 7/32, 16/32 of 4)
            keeps = [budget * c / 66 for c in (66, 30, 17)]
            counts = sparse_counts(keeps, recycle=0.3, image_tokens=IMAGE_TOKENS)
            assert counts == [13, 7, 5]  # 12 + 1 cluster, 6 + 1, 4 + 1
            assert lengths == [text + c for c in (*counts, counts[-1])]
        else:  # the connector: each image keeps the budget, every layer sees it
            kept = tuple(
                min(n, budget) if isinstance(budget, int) else math.ceil(budget * n)
                for n in PER_IMAGE
            )
            assert last_connector(patch).tokens_out == kept
            assert lengths == [text + sum(kept)] * DEPTH
        assert not torch.allclose(logits, plain_logits)  # the reduction acted
        assert answer(model, tq.feed(GRIDS)).shape == (2, NEW)  # batched, left-padded rows run
        assert gptq.gptq_linear_classes(model.model.language_model)
    finally:
        patch.remove()
    again, logits = layer_lengths(model, inputs)
    assert again == plain and torch.equal(logits, plain_logits)  # remove restores exactly


def test_refusals_name_the_reason(model, reference) -> None:
    """Qwen refuses LLM-mode budgets in tokens (its image token count varies per image)
    and the tower stage by method name, saying why; a refusal leaves the model as it was.
    The tower stage itself (``patch.modes = "tower"``) runs on the quantized stack: keeping
    every unit gives the quantized model's logits, half of them the budget's counts."""
    name = type(model).__name__
    for method in ("turbo", "fastv", "pyramiddrop", "sparsevlm"):
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"budget for {method!r} (llm stage) must be a fraction in (0, 1] on a {name}: "
                "its image token count is not fixed, got 8"
            ),
        ):
            apply_vlm_method(model, method, stage="llm", budget=8)
        assert ta.handle_of(model) is None
    with pytest.raises(
        ValueError,
        match=re.escape(
            "stage for method 'turbo' must be one of ('connector', 'llm'), got 'tower'"
        ),
    ):
        apply_vlm_method(model, "turbo", stage="tower")
    inputs = tq.feed(GRIDS)
    patch = ta.apply(model)
    try:
        patch.modes = "tower"
        patch.tower = QwenTowerReduction(budget=1.0, layers=(0,))
        _, logits = layer_lengths(model, inputs)
        torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=1e-5)
        patch.tower = QwenTowerReduction(budget=0.5, layers=(0,))
        _, logits = layer_lengths(model, inputs)
        record = last_connector(patch)
        assert record.tokens_out == tuple(math.ceil(n / 2) for n in record.tokens_in)
        assert not torch.allclose(logits, reference["logits"])  # the tower stage acted
        assert gptq.gptq_linear_classes(model.model.language_model)
    finally:
        patch.remove()
    assert ta.handle_of(model) is None
    assert torch.equal(layer_lengths(model, inputs)[1], reference["logits"])
