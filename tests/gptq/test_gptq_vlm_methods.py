"""The VLM methods by name (``apply_vlm_method``) on a LLaVA whose LLaMA is GPTQ-quantized.

The tiny 4-layer LLaMA is quantized once per session (conftest) and put where the LLaVA's
language model was. Oracles: the same quantized model unpatched (keeping every token:
identical greedy ids, logits to 1e-5), and each method's budget rule written here from
its paper (the connector's count; PyramidDrop's halving; SparseVLM's counts plus its
recycled clusters) against the sequence length each quantized decoder layer receives.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from probes import answer, layer_lengths, sparse_counts  # noqa: E402
from tiny_lm import IMAGE_TOKEN, PAD, llama_config  # noqa: E402

import turbo_adapters as ta  # noqa: E402
from turbo_adapters import VLM_METHODS, apply_vlm_method  # noqa: E402
from turbo_adapters.compose import gptq  # noqa: E402
from turbo_adapters.connector import last_connector  # noqa: E402
from turbo_adapters.families.llava.llm import LLMReduction  # noqa: E402

NEW = 4
IMAGE, PATCH = 32, 8
PER_IMAGE = (IMAGE // PATCH) ** 2  # CLS dropped by the "default" strategy
DEPTH = 4
#: every (method, stage) the library offers by name
RUNS = [(m, s) for m, stages in VLM_METHODS.items() for s in stages]


@torch.no_grad()
def _peaked(model: nn.Module) -> nn.Module:
    """Peaked attention in the float tower and projector (the library's init is nearly
    uniform, which would make every ranking a tie)."""
    generator = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if name.startswith("model.language_model") or p.dim() < 2 or "embed" in name:
            continue
        gain = 3.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
        p.copy_(torch.randn(p.shape, generator=generator) * gain / p.shape[-1] ** 0.5)
    return model.eval()


def llava(folder: Path) -> nn.Module:
    """A tiny ``LlavaForConditionalGeneration`` whose 4-layer LLaMA is the GPTQ one."""
    vision = transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE, patch_size=PATCH,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=llama_config(DEPTH), image_token_id=IMAGE_TOKEN,
        image_seq_length=PER_IMAGE, projector_hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = _peaked(transformers.LlavaForConditionalGeneration(config))
    gptq.attach_gptq(model, gptq.load_gptq(folder))
    assert gptq.gptq_linear_classes(model.model.language_model)
    assert len(model.model.language_model.layers) == DEPTH
    model.generation_config.pad_token_id = PAD
    return model.eval()


@pytest.fixture(scope="module")
def model(quantized_deep_folder: Path) -> nn.Module:
    return llava(quantized_deep_folder)


def feed(batch: int) -> dict[str, torch.Tensor]:
    """One image per row, text of different lengths around it, left-padded."""
    rows = [[3, 5 + b, *[IMAGE_TOKEN] * PER_IMAGE, *range(8, 10 + 2 * b)] for b in range(batch)]
    width = max(len(r) for r in rows)
    ids = torch.full((batch, width), PAD)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = torch.tensor(row)
        mask[b, width - len(row) :] = 1
    pixels = torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(batch))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


@pytest.fixture(scope="module")
def reference(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized model unpatched: greedy answers and last logits of a batch of 2."""
    inputs = feed(2)
    tokens = answer(model, inputs)
    assert len(set(tokens.flatten().tolist())) > 2  # answers depend on the input
    return {"tokens": tokens, "logits": layer_lengths(model, inputs)[1]}


@pytest.mark.parametrize(("method", "stage"), RUNS)
def test_keeping_every_token_equals_the_quantized_model(model, reference, method, stage) -> None:
    inputs = feed(2)
    patch = apply_vlm_method(model, method, stage=stage, budget=1.0)
    if method == "sparsevlm":  # its later stages scale (66, 30, 17): all 16 at every stage
        patch.llm = LLMReduction.sparse_vlm(
            counts=(PER_IMAGE,) * 3,
            layers=[layer for layer, _ in patch.llm.schedule],
            image_tokens=PER_IMAGE,
        )
    try:
        assert torch.equal(answer(model, inputs), reference["tokens"])
        lengths, logits = layer_lengths(model, inputs)
        torch.testing.assert_close(logits, reference["logits"], atol=1e-5, rtol=1e-5)
        # nothing was cut: every layer holds the longest row whole (LLM mode drops padding)
        assert min(lengths) >= int(inputs["attention_mask"].sum(-1).max())
        if stage == "connector":
            record = last_connector(patch)
            assert record.tokens_out == record.tokens_in == (PER_IMAGE, PER_IMAGE)
        assert gptq.gptq_linear_classes(model.model.language_model)  # still the GPTQ layers
    finally:
        patch.remove()
    assert ta.handle_of(model) is None


def pyramid_counts(keep: float, stages: int) -> list[int]:
    """PyramidDrop: stage s keeps ``keep ** (s + 1)`` of the image's tokens (rounded up)."""
    return [math.ceil(keep ** (s + 1) * PER_IMAGE - 1e-9) for s in range(stages)]


@pytest.mark.parametrize(
    ("method", "budget"), [("pyramiddrop", 0.5), ("sparsevlm", 0.5), ("divprune", 5),
                           ("visionzip", 6), ("cdpruner", 0.25), ("turbo", 3)],
)  # fmt: skip
def test_budgets_are_exact_in_the_quantized_decoder(model, method, budget) -> None:
    inputs = feed(1)
    text = int((inputs["input_ids"][0] != IMAGE_TOKEN).sum())
    plain, plain_logits = layer_lengths(model, inputs)
    assert plain == [text + PER_IMAGE] * DEPTH
    patch = apply_vlm_method(model, method, budget=budget)
    try:
        lengths, logits = layer_lengths(model, inputs)
        if method == "pyramiddrop":  # drops at layers 1, 2, 3 (a quarter, half, 3/4)
            counts = pyramid_counts(budget, 3)
            assert lengths == [text + PER_IMAGE, *[text + c for c in counts]]
            assert counts == [8, 4, 2]
        elif method == "sparsevlm":  # raters at layers 0, 1, 2 (3/32, 7/32, 16/32 of 4)
            keeps = [budget * c / 66 for c in (66, 30, 17)]
            counts = sparse_counts(keeps, recycle=0.3, image_tokens=PER_IMAGE)
            assert lengths == [text + c for c in (*counts, counts[-1])]
            assert counts == [9, 5, 4]  # 8 + 1 cluster, 4 + 1, 3 + 1
        else:  # the connector: every layer sees the budget
            kept = budget if isinstance(budget, int) else math.ceil(budget * PER_IMAGE)
            assert lengths == [text + kept] * DEPTH
            assert last_connector(patch).tokens_out == (kept,)
        assert not torch.allclose(logits, plain_logits)  # the reduction acted
        assert answer(model, feed(2)).shape == (2, NEW)  # batched, left-padded rows run
        assert gptq.gptq_linear_classes(model.model.language_model)
    finally:
        patch.remove()
    again, logits = layer_lengths(model, inputs)
    assert again == plain and torch.equal(logits, plain_logits)  # remove restores exactly
