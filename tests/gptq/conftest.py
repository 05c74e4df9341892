"""Session fixtures of the ``gptq`` tox environment: each tiny language model is
GPTQ-quantized once per session (gptqmodel, CPU) and loaded fresh by every test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
pytest.importorskip("gptqmodel")
pytest.importorskip("transformers")

from tiny_lm import VOCAB, save_tiny_lm

from turbo_adapters.compose import gptq


@pytest.fixture(autouse=True, scope="session")
def _logs_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """gptqmodel writes ``logs/`` into the working directory: keep it out of the checkout."""
    before = Path.cwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: thread start-up costs more than it saves (CI has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quantized(root: Path, kind: str, layers: int = 2) -> Path:
    save_tiny_lm(root / "dense", kind, layers)
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randint(4, VOCAB, (1, 32), generator=generator) for _ in range(4)]
    return gptq.quantize_gptq(root / "dense", root / "gptq", calibration, bits=4, group_size=32)


@pytest.fixture(scope="session")
def quantized_folder(_logs_in_tmp: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-bit GPTQ ``LlamaForCausalLM`` (:func:`tiny_lm.llama_config`) and its tokenizer."""
    return _quantized(tmp_path_factory.mktemp("gptq-llama"), "llama")


@pytest.fixture(scope="session")
def quantized_opt_folder(_logs_in_tmp: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-bit GPTQ ``OPTForCausalLM`` (:func:`tiny_lm.opt_config`) and its tokenizer."""
    return _quantized(tmp_path_factory.mktemp("gptq-opt"), "opt")


@pytest.fixture(scope="session")
def quantized_deep_folder(_logs_in_tmp: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-bit GPTQ ``LlamaForCausalLM`` with 4 decoder layers (the staged LLM-mode methods
    need at least 4: PyramidDrop drops at a quarter, half and three quarters of the depth)."""
    return _quantized(tmp_path_factory.mktemp("gptq-llama4"), "llama", layers=4)


@pytest.fixture(scope="session")
def quantized_qwen2_folder(_logs_in_tmp: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-bit GPTQ ``Qwen2ForCausalLM`` with 4 decoder layers (:func:`tiny_lm.qwen2_config`):
    the decoder of the tiny Qwen2-VL and Qwen2.5-VL."""
    return _quantized(tmp_path_factory.mktemp("gptq-qwen2"), "qwen2", layers=4)
