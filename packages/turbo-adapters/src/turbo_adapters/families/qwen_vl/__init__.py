"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the connector stage (M-RoPE positions of the kept
tokens, deepstack features cut alike) and LLM mode; :mod:`.adapter`, :mod:`.positions`."""

from .adapter import QwenVLAdapter

__all__ = ["QwenVLAdapter"]
