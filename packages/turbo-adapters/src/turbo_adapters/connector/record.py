"""What the connector stage did in the last call of this thread (per patch)."""

from __future__ import annotations

import dataclasses
import threading

import torch

from ..patch import TurboPatch

__all__ = ["ConnectorRecord", "last_connector", "set_last_connector"]

_KEY = "connector_last"


@dataclasses.dataclass(frozen=True)
class ConnectorRecord:
    """One call's connector stage.

    Attributes:
        tokens_in: tokens per image before the stage (images in batch order).
        tokens_out: tokens per image after it.
        index: per image, the kept tokens' positions within the image.
        sizes: per image, how many input tokens each kept token stands for.
    """

    tokens_in: tuple[int, ...]
    tokens_out: tuple[int, ...]
    index: tuple[torch.Tensor, ...]
    sizes: tuple[torch.Tensor, ...]


def set_last_connector(patch: TurboPatch, record: ConnectorRecord) -> None:
    patch.family_state(_KEY, threading.local).record = record


def last_connector(patch: TurboPatch) -> ConnectorRecord | None:
    """The connector record of the last call this thread made through ``patch``, or None."""
    return getattr(patch.family_state(_KEY, threading.local), "record", None)
