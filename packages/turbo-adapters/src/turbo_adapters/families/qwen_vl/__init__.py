"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the connector stage (M-RoPE positions of the kept
tokens, deepstack features cut alike), the tower stage (Qwen2/2.5-VL: whole 2x2 units
merged inside the vision tower, :mod:`.tower`) and LLM mode; :mod:`.adapter`,
:mod:`.positions`."""

from .adapter import QwenVLAdapter
from .tower import QwenTowerReduction, QwenVLPatch

__all__ = ["QwenTowerReduction", "QwenVLAdapter", "QwenVLPatch"]
