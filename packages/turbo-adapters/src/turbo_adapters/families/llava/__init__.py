"""LLaVA-1.5 and LLaVA-NeXT (transformers 5): fewer image tokens into the language model.

The family is a package: :mod:`.adapter` (the adapter, tower mode and the entry points),
:mod:`.llm` (LLM mode at decoder layer K, shared with MiniGPT-v2), :mod:`.modes` (the
tower / LLM modes of a vision-language patch) and :mod:`.shrink` (placeholder runs cut to
the merged counts).
"""

from .adapter import LlavaAdapter, LlavaPatch, parse_modes
from .llm import LLMReduction

__all__ = ["LLMReduction", "LlavaAdapter", "LlavaPatch", "parse_modes"]
