"""The public conformance kit on the diffusion-transformer families (PixArt, SD3, SD3.5, FLUX).

Each case is a tiny diffusers transformer built in code (tests/support/tiny_dit.py). The
kit's ``r`` becomes a merge ratio ``r / 10`` (see :class:`DiTOps`); checks that have no
meaning for ratio-based merge-and-restore are skipped with their reason, as for the UNet.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from support import tiny_dit

from turbo_adapters.testing import Case, KitOps, parametrize, run_check


class DiTOps(KitOps):
    """The kit's r on a diffusion transformer: ratio ``r / 10`` on the given components.

    Merge-and-restore gives the full length back after every component: the counts
    compared are the image tokens inside each block after its merge (``N - int(N *
    ratio)``, capped at what 2x2 windows allow). Destinations are the windows' top-left
    tokens (``use_rand=False``): random ones are drawn per denoising step, and the kit's
    repeated calls would be successive steps.
    """

    def __init__(self, tokens: int, components: tuple[str, ...], depth: int) -> None:
        self.tokens = tokens
        self.components = components
        self.depth = depth
        self.max_r = tokens - tokens // 4

    def settings(self, r: Any) -> dict[str, float]:
        return {f"ratio_{c}": (r / 10 if c in self.components else 0.0) for c in ("attn1", "ff")}

    def apply(self, model: nn.Module, r: Any, **config: Any) -> Any:
        import turbo_adapters as ta

        return ta.apply(model, use_rand=False, **self.settings(r), **config)

    def set_r(self, patch: Any, r: Any) -> None:
        patch.configure(**self.settings(r))

    def counts(self, patch: Any) -> list[int]:
        (stats,) = patch.last_stats.values()
        assert not stats.passed, stats.passed
        first = self.components[0]
        # ratio 0 plans nothing: every block keeps its tokens
        return [self.tokens - r.get(first, 0) for _, _, r in stats.tokens] or [
            self.tokens
        ] * self.depth

    def expected(self, case: Case, schedule: list[int]) -> list[int]:
        return [case.tokens - min(int(case.tokens * (r / 10)), self.max_r) for r in schedule]

    def source(self, patch: Any) -> None:
        return None  # the plans live inside one call; the outputs are compared


def blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("TransformerBlock")]


def positional(kwargs: dict[str, Any], names: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(kwargs[n] for n in names)


FLUX_GRID = (8, 8)
IMG_IDS, TXT_IDS = tiny_dit.flux_ids(*FLUX_GRID)

SKIP = {
    "counts_follow_schedule": "diffusion transformers merge one ratio per component in every "
    "block (tomesd's interface): per-block r lists, ToMe's (r, inflection) schedule and a "
    "Target count do not exist there",
    "block_matches_float64_oracle": "the kit's oracle is bipartite matching ranked by a CLS row; "
    "these models match in 2-D windows and restore after each component: their oracles are in "
    "test_dit.py (FLUX's rotary rows against the model's own position embedding)",
    "roles_survive_settings": "2-D window matching: the scorer and matcher roles do not apply",
    "bypass_is_reported": "merge and restore are torch module hooks, which torch runs whatever "
    "forward a block has: replacing a block's forward bypasses nothing here",
    "torch_pruning": "no pruning rule for diffusers' transformer blocks here",
    "torchao_int8": "torchao is not in this environment's test set for diffusers models",
}
CASES = [
    Case(
        "diffusers-pixart",
        tiny_dit.tiny_pixart,
        lambda b: positional(
            tiny_dit.pixart_inputs(b), ("hidden_states", "encoder_hidden_states", "timestep")
        ),
        lambda m, a: m(*a).sample,
        64,
        0,
        blocks,
        None,
        None,
        cannot=SKIP,
        ops=DiTOps(64, ("attn1", "ff"), 2),
    ),
    Case(
        "diffusers-sd3",
        tiny_dit.tiny_sd3,
        lambda b: positional(
            tiny_dit.sd3_inputs(b),
            ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
        ),
        lambda m, a: m(*a).sample,
        64,
        0,
        blocks,
        None,
        None,
        cannot=SKIP,
        ops=DiTOps(64, ("attn1", "ff"), 2),
    ),
    Case(
        "diffusers-sd3.5",
        lambda: tiny_dit.tiny_sd3(dual=True),
        lambda b: positional(
            tiny_dit.sd3_inputs(b),
            ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
        ),
        lambda m, a: m(*a).sample,
        64,
        0,
        blocks,
        None,
        None,
        cannot=SKIP,
        ops=DiTOps(64, ("attn1", "ff"), 2),
    ),
    Case(
        "diffusers-flux",
        tiny_dit.tiny_flux,
        lambda b: positional(
            tiny_dit.flux_inputs(b),
            ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
        ),
        lambda m, a: m(*a, img_ids=IMG_IDS, txt_ids=TXT_IDS).sample,
        64,
        0,
        blocks,
        None,
        None,
        cannot=SKIP,
        ops=DiTOps(64, ("attn1", "ff"), 3),
    ),
]


@parametrize(CASES)
def test_conformance(case: Case, check: str) -> None:
    run_check(case, check)


def test_every_dit_family_has_a_case() -> None:
    import turbo_adapters as ta

    names = {ta.adapter_for_model(case.build()).name for case in CASES}
    assert names == {"pixart", "sd3", "flux"}
    assert torch.get_default_dtype() == torch.float32
