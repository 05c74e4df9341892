"""Turbo core: informativity-driven token merging, independent of any model library."""

from .attention import add_size_bias, guide_attention, size_log_bias
from .config import PRESETS, Fusion, Mode, TurboConfig, expand_r
from .connector import (
    CONNECTOR_METHODS,
    ConnectorInputs,
    ConnectorMethod,
    ReducedTokens,
    check_reduced,
    get_connector_method,
    register_connector_method,
)
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
from .selection import (
    CDPruner,
    DivPrune,
    TurboSelection,
    VisionZip,
    dpp_greedy_map,
    instruction_relevance,
)
from .state import ReductionState
from .windows import WindowScores, max_window_mergeable, score_windows, window_destinations

__version__ = "0.1.0"

__all__ = [
    "CONNECTOR_METHODS",
    "PRESETS",
    "BipartiteMatcher",
    "CDPruner",
    "ConnectorInputs",
    "ConnectorMethod",
    "CopyRestorer",
    "CountRule",
    "DivPrune",
    "Fusion",
    "InformationScorer",
    "Matcher",
    "MergePlan",
    "Merger",
    "Mode",
    "RClippedWarning",
    "RSpec",
    "Ratio",
    "ReducedTokens",
    "ReductionState",
    "ResolvedSchedule",
    "Restorer",
    "Scorer",
    "SizeWeightedMerger",
    "Target",
    "TokenReducer",
    "TokenScores",
    "TurboConfig",
    "TurboSelection",
    "VisionZip",
    "WindowScores",
    "add_size_bias",
    "attention_concentration",
    "attention_entropy",
    "check_reduced",
    "dpp_greedy_map",
    "expand_r",
    "fuse_information",
    "get_connector_method",
    "guide_attention",
    "instruction_relevance",
    "max_mergeable",
    "max_removable",
    "max_window_mergeable",
    "merge_sources",
    "register_connector_method",
    "resolve_schedule",
    "score_windows",
    "size_log_bias",
    "token_redundancy",
    "window_destinations",
]
