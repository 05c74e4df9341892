"""Which method runs at which stage on which registered family (``turbo-eval methods``).

Every family declares its ``stages`` (:class:`~turbo_adapters.adapter.FamilyAdapter`);
each method names the stages it runs at. A family offers a method where the two meet,
except for the pairs in :data:`REFUSED`, which the family turns down with a reason.
Checks that depend on the installed library (LLM mode's decoder check) still run at
``apply``: this table says what a family offers, not what a given version allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import get_adapter, list_adapters

__all__ = ["REFUSED", "STAGE_METHODS", "MethodSupport", "family_stages", "method_support"]

#: stage -> the methods that run there, by the names ``apply`` / ``apply_vlm_method`` take
STAGE_METHODS: dict[str, tuple[str, ...]] = {
    # TurboConfig modes at every tower site: redundancy (ToMe), fused, semantics only
    "tower": ("tome", "turbo", "semantics"),
    "connector": ("turbo", "visionzip", "divprune", "cdpruner"),
    "llm": ("turbo", "fastv", "pyramiddrop", "sparsevlm"),
    # Stable Diffusion and DiT settings: method="turbo" | "todo" | "toma"
    "denoiser": ("turbo", "todo", "toma"),
}

#: (method, stage) -> {family: why it refuses although it offers the stage} (ToDo runs on
#: the joint attention of SD3 and FLUX too: its ``todo_mode="avg"`` alone is refused on
#: FLUX, at ``apply``, a setting not a method)
REFUSED: dict[tuple[str, str], dict[str, str]] = {
    ("semantics", "tower"): {
        "qwen-vl": "Qwen's vision tower has no CLS token to guide it: its tower stage ranks "
        "2x2 units by redundancy only"
    },
}


@dataclass(frozen=True)
class MethodSupport:
    """One method at one stage: the families that run it and those that refuse it."""

    method: str
    stage: str
    families: tuple[str, ...]
    refused: dict[str, str]
    #: family -> which of its models the stage does not cover
    limits: dict[str, str]


def family_stages() -> dict[str, tuple[str, ...]]:
    """Every registered adapter's stages (``("tower",)`` when it declares none)."""
    return {
        name: tuple(getattr(get_adapter(name), "stages", ("tower",))) for name in list_adapters()
    }


def method_support() -> list[MethodSupport]:
    """Every (method, stage) pair with the families offering it, stage by stage."""
    stages = family_stages()
    rows = []
    for stage, methods in STAGE_METHODS.items():
        offering = tuple(name for name, offered in stages.items() if stage in offered)
        for method in methods:
            refused = {
                name: why
                for name, why in REFUSED.get((method, stage), {}).items()
                if name in offering
            }
            families = tuple(name for name in offering if name not in refused)
            limits = {
                name: get_adapter(name).stage_limits[stage]
                for name in families
                if stage in getattr(get_adapter(name), "stage_limits", {})
            }
            rows.append(MethodSupport(method, stage, families, refused, limits))
    return rows
