"""The methods: their config overrides and result cells (:mod:`~turbo_eval.methods.overrides`),
applying one to a loaded model (:mod:`~turbo_eval.methods.apply`), and the two kinds that
need a vision-language model's parts: text-guided reduction at equal FLOPs
(:mod:`~turbo_eval.methods.cross_modal`) and ``log(size)`` downstream
(:mod:`~turbo_eval.methods.size_bias`). Every name comes from
:data:`turbo_eval.names.METHOD_TABLE`.
"""

from .apply import apply_method
from .overrides import LABELS, Cell, MethodSettings, cells_for, method_overrides

__all__ = ["LABELS", "Cell", "MethodSettings", "apply_method", "cells_for", "method_overrides"]
