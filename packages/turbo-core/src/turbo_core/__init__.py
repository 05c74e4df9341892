"""Turbo core: informativity-driven token merging, independent of any model library."""

from .attention import add_size_bias, guide_attention, size_log_bias
from .config import PRESETS, Fusion, Mode, TurboConfig, expand_r
from .informativity import attention_concentration, attention_entropy, token_redundancy
from .matching import BipartiteMatcher, Matcher, max_mergeable
from .merging import Merger, SizeWeightedMerger, merge_sources
from .plan import MergePlan
from .reducer import TokenReducer
from .restoring import CopyRestorer, Restorer
from .schedule import (
    CountRule,
    Ratio,
    RClippedWarning,
    ResolvedSchedule,
    RSpec,
    Target,
    max_removable,
    resolve_schedule,
)
from .scoring import InformationScorer, Scorer, TokenScores, fuse_information
from .state import ReductionState
from .windows import WindowScores, max_window_mergeable, score_windows, window_destinations

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BipartiteMatcher",
    "CopyRestorer",
    "CountRule",
    "Fusion",
    "InformationScorer",
    "Matcher",
    "MergePlan",
    "Merger",
    "Mode",
    "RClippedWarning",
    "RSpec",
    "Ratio",
    "ReductionState",
    "ResolvedSchedule",
    "Restorer",
    "Scorer",
    "SizeWeightedMerger",
    "Target",
    "TokenReducer",
    "TokenScores",
    "TurboConfig",
    "WindowScores",
    "add_size_bias",
    "attention_concentration",
    "attention_entropy",
    "expand_r",
    "fuse_information",
    "guide_attention",
    "max_mergeable",
    "max_removable",
    "max_window_mergeable",
    "merge_sources",
    "resolve_schedule",
    "score_windows",
    "size_log_bias",
    "token_redundancy",
    "window_destinations",
]
