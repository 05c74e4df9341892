"""Vision-language models for the captioning, VQA and retrieval tasks, split by job.

- :mod:`~turbo_eval.vl.catalog`: what turbo-eval drives (classes, named checkpoints,
  prompt templates); data only.
- :mod:`~turbo_eval.vl.heads`: each family's call logic (generate, teacher-forced, ITM).
- :mod:`~turbo_eval.vl.model`: :class:`VLModel`, the loaded model the tasks call.
- :mod:`~turbo_eval.vl.options`: the model options a suite may set, checked.
- :mod:`~turbo_eval.vl.loading`: :func:`load_vl_model` (a local folder, the local cache,
  or a named config with random weights); :mod:`~turbo_eval.vl.minigpt`: MiniGPT-v2.
- :mod:`~turbo_eval.vl.assemble`: module + head + tokenizer + image processor -> model.
- :mod:`~turbo_eval.vl.random_init`: :func:`scale_weights` and config overrides.
- :mod:`~turbo_eval.vl.tokenizers` and :mod:`~turbo_eval.vl.word_tokenizer`: tokenizers
  made in code for random-weight models.
"""

from ..vl_data import VLSample
from .catalog import NAMED_MODELS, VL_ARCHITECTURES, is_vl_model, vl_architecture
from .loading import load_vl_model
from .model import SpeedInputs, VLModel
from .options import VL_OPTIONS
from .random_init import scale_weights

__all__ = [
    "NAMED_MODELS",
    "VL_ARCHITECTURES",
    "VL_OPTIONS",
    "SpeedInputs",
    "VLModel",
    "VLSample",
    "is_vl_model",
    "load_vl_model",
    "scale_weights",
    "vl_architecture",
]
