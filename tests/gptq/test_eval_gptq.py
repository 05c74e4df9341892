"""turbo-eval's ``gptq`` and ``turbo+gptq`` methods on a tiny LLaVA (gptq environment).

The dense LLaVA's LLaMA is the one the session quantized (conftest), so the ``gptq``
side is that model with its language model swapped for the GPTQ one. Oracles: the
dense model is untouched by the side; ``turbo+gptq`` at r = 0 equals ``gptq`` alone;
at r > 0 the tower's token counts follow the schedule.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("turbo_eval")

from tiny_lm import IMAGE_TOKEN, llama_config  # noqa: E402

from turbo_adapters.compose import gptq  # noqa: E402
from turbo_eval.methods import apply_method, cells_for  # noqa: E402
from turbo_eval.models import LoadedModel  # noqa: E402
from turbo_eval.suite import parse_suite  # noqa: E402

IMAGE, PATCH, R = 32, 8, 3
PER_IMAGE = (IMAGE // PATCH) ** 2


def dense_llava(lm_folder: Path) -> nn.Module:
    vision = transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE, patch_size=PATCH,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=llama_config(), image_token_id=IMAGE_TOKEN,
        image_seq_length=PER_IMAGE,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config)
    dense = transformers.LlamaForCausalLM.from_pretrained(lm_folder)  # what was quantized
    model.model.language_model, model.lm_head = dense.model, dense.lm_head
    return model.eval()


def prepare(items: list[Any]) -> torch.Tensor:
    pixels = torch.from_numpy(np.stack(items)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return nn.functional.interpolate(pixels, size=(IMAGE, IMAGE), mode="bilinear")


def next_token_logits(module: nn.Module, pixels: torch.Tensor, handle: Any) -> torch.Tensor:
    prompt = [3, 5, *[IMAGE_TOKEN] * PER_IMAGE, 8, 9]
    ids = torch.tensor([prompt] * pixels.shape[0])
    return module(input_ids=ids, pixel_values=pixels).logits[:, -1]


def test_gptq_methods_run_on_the_quantized_side(quantized_folder: Path) -> None:
    suite = parse_suite(
        textwrap.dedent(f"""\
            [suite]
            methods = ["baseline", "gptq", "turbo+gptq"]
            alpha = [5.0]

            [[models]]
            name = "tiny-llava"
            r = [0, {R}]
            gptq_model = "{quantized_folder}"

            [[tasks]]
            kind = "fidelity"
            model = "tiny-llava"
        """)
    )
    dense = dense_llava(quantized_folder.parent / "dense")
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    loaded = LoadedModel(
        "tiny-llava", dense, "image", prepare, next_token_logits,
        options=dict(suite.model("tiny-llava").options),
    )  # fmt: skip
    photos = list(np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8))
    cells = {(c.method, c.r): c for c in cells_for(suite, "tiny-llava", "fidelity")}
    assert set(cells) == {("baseline", 0), ("gptq", 0), ("turbo+gptq", 0), ("turbo+gptq", R)}

    features = {}
    for key in [("baseline", 0), ("gptq", 0), ("turbo+gptq", 0), ("turbo+gptq", R)]:
        apply_method(loaded, cells[key].overrides(suite))
        features[key] = loaded.features(photos)
        if key[0] != "baseline":
            assert gptq.gptq_linear_classes(loaded.module)
        if key == ("turbo+gptq", R):
            counts = loaded.handle.last_state.token_counts
    loaded.set_method(None)
    assert loaded.module is dense and not gptq.gptq_linear_classes(dense)
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())

    quantized, stacked = features["gptq", 0], features["turbo+gptq", 0]
    torch.testing.assert_close(stacked, quantized, atol=1e-5, rtol=1e-5)
    assert not torch.equal(quantized, features["baseline", 0])  # 4-bit weights differ
    cos = nn.functional.cosine_similarity(quantized, features["baseline", 0], dim=-1)
    assert (cos > 0.9).all()  # ... but it is the same language model
    assert counts == [PER_IMAGE + 1 - R, PER_IMAGE + 1 - 2 * R]  # 2 layers reach layer -2
    assert torch.isfinite(features["turbo+gptq", R]).all()
