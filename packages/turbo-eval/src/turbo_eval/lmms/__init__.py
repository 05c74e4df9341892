"""Turbo's door into lmms-eval: a model (``--model turbo``) and a packaged offline task.

- :mod:`.methods`: every token-reduction method by name on a transformers VLM, one call
  (no lmms-eval needed);
- :mod:`.easy_vqa`: writes an lmms-eval task folder from easy-VQA (no lmms-eval needed);
- :mod:`.model`: the lmms-eval model class (imports lmms-eval);
- :mod:`.registration`: the manifest lmms-eval's ``lmms_eval.models`` entry point loads.

Install with ``pip install "turbo-eval[lmms]"``. Nothing here is imported by the rest of
turbo-eval, which works without lmms-eval.
"""
