"""Video frames at the connector stage (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): one reduction per
frame group.

A Qwen2/2.5-VL video of ``t`` temporal patches (two frames each) is one ``<|video_pad|>``
run of ``t * h * w / 4`` tokens, frame group after frame group; Qwen3-VL writes each frame
group in a run of its own (after its timestamp), the same tokens in the same order
(:func:`check_frame_runs`). The stage reduces every frame group like an image of
``h * w / 4`` tokens (the budget applies per frame group), so counts depend only on the
budget and the grids. Images and frame groups are handed to
the stage in the order of their placeholders in the prompt (row-major), with every
video placeholder shown to it as an image placeholder; the real token ids are put back
afterwards from the kept columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

__all__ = [
    "VisualGroup",
    "check_frame_runs",
    "frame_groups",
    "per_video",
    "placeholder_order",
    "unify_placeholders",
    "visual_groups",
]


@dataclasses.dataclass(frozen=True)
class VisualGroup:
    """One unit the stage reduces: an image, or one frame group of a video.

    Attributes:
        video: whether it is a video's frame group.
        item: the image's or the video's index (batch order, as the model numbers them).
        frame: the frame group within the video (0 for images).
        offset: the frame group's first token within the video's tokens.
    """

    video: bool
    item: int
    frame: int = 0
    offset: int = 0


def frame_groups(features: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
    """A video's ``(t * n, D)`` tokens as ``t`` frame groups of ``(n, D)``."""
    t = int(grid[0])
    if t < 1 or features.shape[0] % t:
        raise ValueError(
            f"a video with grid {tuple(int(g) for g in grid)} cannot have "
            f"{features.shape[0]} tokens (not t = {t} frame groups of equal size)"
        )
    return list(features.split(features.shape[0] // t))


def placeholder_order(
    input_ids: torch.Tensor,
    image_token_id: int,
    video_token_id: int,
    image_tokens: Sequence[int],
    video_tokens: Sequence[int],
) -> list[tuple[bool, int]]:
    """Images and videos, ``(is_video, index)``, in the order of their placeholder runs.

    Raises:
        ValueError: if the placeholders do not add up to the images' and videos' tokens
            (or a run mixes image and video placeholders).
    """
    is_visual = (input_ids == image_token_id) | (input_ids == video_token_id)
    kinds = (input_ids[is_visual] == video_token_id).tolist()  # row-major: the scatter order
    want = (sum(image_tokens), sum(video_tokens))
    got = (len(kinds) - sum(kinds), sum(kinds))
    if got != want:
        raise ValueError(
            f"input_ids hold {got[0]} image and {got[1]} video placeholders but the images "
            f"have {want[0]} tokens ({list(image_tokens)}) and the videos {want[1]} "
            f"({list(video_tokens)})"
        )
    order: list[tuple[bool, int]] = []
    position, counts, seen = 0, (image_tokens, video_tokens), [0, 0]
    while position < len(kinds):
        video = bool(kinds[position])
        item = seen[video]
        n = counts[video][item]
        if any(bool(k) != video for k in kinds[position : position + n]):
            raise ValueError(
                "an image or video placeholder run does not match its token count: image and "
                "video placeholders are interleaved"
            )
        order.append((video, item))
        seen[video] += 1
        position += n
    return order


def check_frame_runs(
    input_ids: torch.Tensor, video_token_id: int, video_grids: torch.Tensor
) -> None:
    """Qwen3-VL's layout: every frame group of every video in a placeholder run of its own
    (the processor writes ``<timestamp> <vision_start> <video_pad> * n <vision_end>`` per
    frame group, and M-RoPE numbers the runs one by one).

    Raises:
        ValueError: if the runs of video placeholders are not one per frame group.
    """
    is_video = input_ids == video_token_id
    starts = is_video.clone()
    starts[:, 1:] &= ~is_video[:, :-1]
    runs, frames = int(starts.sum()), int(video_grids[:, 0].sum())
    if runs != frames:
        raise ValueError(
            f"input_ids hold {runs} runs of video placeholders but the videos have {frames} "
            "frame groups: Qwen3-VL numbers each frame group's run on its own (a timestamp "
            "and <vision_start> ... <vision_end> per frame group, as its processor writes), "
            "so the connector stage cannot place kept video tokens in other layouts"
        )


def unify_placeholders(
    input_ids: torch.Tensor, image_token_id: int, video_token_id: int
) -> torch.Tensor:
    """``input_ids`` with every video placeholder shown as an image placeholder."""
    return input_ids.masked_fill(input_ids == video_token_id, image_token_id)


def visual_groups(
    input_ids: torch.Tensor,
    image_token_id: int,
    video_token_id: int,
    images: Sequence[torch.Tensor],
    videos: Sequence[torch.Tensor],
    video_grids: torch.Tensor,
) -> tuple[list[VisualGroup], list[torch.Tensor]]:
    """The units the stage reduces, in prompt order (every image, every video's frame
    groups), and their tokens."""
    order = placeholder_order(
        input_ids, image_token_id, video_token_id, [f.shape[0] for f in images],
        [f.shape[0] for f in videos],
    )  # fmt: skip
    groups: list[VisualGroup] = []
    features: list[torch.Tensor] = []
    for video, item in order:
        if not video:
            groups.append(VisualGroup(False, item))
            features.append(images[item])
            continue
        for frame, part in enumerate(frame_groups(videos[item], video_grids[item])):
            groups.append(VisualGroup(True, item, frame, frame * part.shape[0]))
            features.append(part)
    return groups, features


def per_video(
    groups: Sequence[VisualGroup],
    tokens: Sequence[torch.Tensor],
    index: Sequence[torch.Tensor],
    num_videos: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each video's kept tokens and their indices within the video, frame group after frame
    group, from the stage's per-group results (``tokens``, ``index`` in group order)."""
    kept: list[list[torch.Tensor]] = [[] for _ in range(num_videos)]
    where: list[list[torch.Tensor]] = [[] for _ in range(num_videos)]
    for group, t, i in zip(groups, tokens, index, strict=True):
        if group.video:
            kept[group.item].append(t)
            where[group.item].append(i + group.offset)
    return [torch.cat(t) for t in kept], [torch.cat(i) for i in where]
