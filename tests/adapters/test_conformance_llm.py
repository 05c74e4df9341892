"""Every family's LLM stage (FastV-style at decoder layer K) through the LLM checks
(support.llm_kit): keep-all equals unpatched greedy tokens, remove is exact, batch rows
equal single rows, counts follow the keep budget, accelerate hooks. PaliGemma and Gemma 3
refuse LLM mode (prefix-LM attention; test_vlm_methods.py checks the refusal)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from support import connector_cases as cc
from support.llm_kit import LLM_CHECKS, llm_case, run_llm_check

pytestmark = pytest.mark.usefixtures("one_thread")

#: why the unpatched model cannot generate under cpu_offload (the check then uses
#: accelerate's device-alignment hooks), beyond the connector cases' own reasons
OFFLOAD = {
    "llava-next": "the unpatched LLaVA-NeXT's generate encodes images through "
    "get_image_features outside LlavaNextModel.forward: under cpu_offload its image_newline "
    "stays on the meta device and generate fails",
}
#: Qwen3-VL's deepstack adds image features at decoder layers 0 and 1: K >= 2
CASES = [
    llm_case(case, layer=2 if case.id == "qwen3_vl" else 1, offload=OFFLOAD.get(case.id))
    for case in cc.CASES
    if case.id not in ("paligemma", "gemma3")
]


@pytest.mark.parametrize("check", sorted(LLM_CHECKS))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_llm_conformance(case, check) -> None:
    run_llm_check(case, check)
