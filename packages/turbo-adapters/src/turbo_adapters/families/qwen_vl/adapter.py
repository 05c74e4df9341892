"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers 5): fewer image tokens into the LLM.

Stages (``patch.modes`` or ``turbo_mode=`` per call, as for LLaVA):

- ``"connector"`` (the default): after the tower's PatchMerger, each image's tokens are
  reduced to ``patch.connector``'s budget; its ``<|image_pad|>`` run is cut to the kept
  tokens, the rows re-padded, and M-RoPE gets the kept tokens' own ``(t, h, w)``
  positions (:mod:`.positions`), so the text after an image keeps its positions, in
  ``forward`` and ``generate``. Qwen3-VL's deepstack features are cut with the same
  indices (a merged token keeps its kept token's deepstack feature). Videos are reduced
  like images, one frame group (temporal patch) at a time (:mod:`.video`): the budget
  applies per frame group, the ``<|video_pad|>`` runs keep the kept tokens and M-RoPE
  their ``(t, h, w)`` positions; Qwen3-VL writes each frame group in a run of its own
  after its timestamp (another layout is refused), its M-RoPE numbers the runs one by
  one, and its video deepstack features are cut with the video's kept indices. The
  connector record lists images and frame groups in prompt order.
- ``"llm"``: FastV-style at decoder layer K (:mod:`..llava.llm`); Qwen3-VL needs K at or
  after its deepstack depth (deepstack adds features to the image positions of layers
  0..d-1, which must all still be there).
- ``"tower"`` (Qwen2-VL and Qwen2.5-VL): whole 2x2 units merge inside the vision tower,
  within each attention window (:mod:`.tower`, settings ``patch.tower =
  QwenTowerReduction(budget=..., layers=(0, 1, 2, 3))``, the budget by default
  ``patch.connector.budget``), and the kept tokens go down the connector's path (runs
  cut, kept M-RoPE positions, ``log(size)`` in the decoder). Images only: videos pass
  through unreduced (a warning says so). ``"tower"`` with ``"llm"`` runs both;
  ``"tower"`` with ``"connector"`` is refused. Qwen3-VL refuses the tower stage: its
  tower's intermediate layers feed the deepstack mergers, which would need the kept
  units at every tap.

Guide: Qwen's tower has no CLS token (and no pooling head); ``ConnectorReduction.guide``
chooses ``"mean"`` (the default) or ``"text"`` (:mod:`...connector.guides`); methods also
get the instruction's text embeddings (``ConnectorInputs.text``).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from turbo_core import TurboConfig

from ...compat import IncompatibleLibraryError
from ...connector.calls import check_call, cut_call, module_weights, reduce_call
from ...connector.guides import resolve_guide
from ...patch import TurboPatch
from ..hf_base import HFAdapter
from ..llava.adapter import _pad_id
from ..llava.llm import (
    bind_arguments,
    check_decoder,
    forward_in_call,
    install_decoder_layers,
    start_call,
)
from ..llava.modes import mode_scope, shrunk_generate
from ..llava.size_bias import install_size_bias
from .positions import install_positions, kept_positions
from .tower import QwenTowerReduction, QwenVLPatch, install_tower, tower_call, tower_support
from .video import VisualGroup, check_frame_runs, per_video, unify_placeholders, visual_groups

__all__ = ["QwenTowerReduction", "QwenVLAdapter", "QwenVLPatch"]

#: per image its kept indices, and per video its kept indices (None: no video reduced)
Kept = tuple[list[Any], list[torch.Tensor] | None]

TOWER_REFUSAL = (
    "Qwen3-VL's vision tower feeds its intermediate layers to the deepstack mergers "
    "(deepstack_visual_indexes), whose features would all need the merged units: the "
    "tower stage runs on Qwen2-VL and Qwen2.5-VL only; use 'connector' or 'llm'"
)


class QwenVLAdapter(HFAdapter):
    """transformers ``Qwen2VL``, ``Qwen2_5_VL`` and ``Qwen3VL`` models (with and without
    the LM head)."""

    name = "qwen-vl"
    stages = ("tower", "connector", "llm")
    stage_limits = MappingProxyType(
        {"tower": "Qwen2-VL and Qwen2.5-VL only (not Qwen3-VL, whose deepstack taps "
                  "intermediate tower layers); images only, redundancy ranking (no CLS)"}
    )  # fmt: skip
    model_names = (
        "Qwen/Qwen2-VL-*", "Qwen/Qwen2.5-VL-*", "Qwen/Qwen3-VL-*",
        "qwen2-vl*", "qwen2.5-vl*", "qwen3-vl*",
    )  # fmt: skip
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    models = (
        "transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VLForConditionalGeneration",
        "transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VLModel",
        "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
        "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLModel",
        "transformers.models.qwen3_vl.modeling_qwen3_vl:Qwen3VLForConditionalGeneration",
        "transformers.models.qwen3_vl.modeling_qwen3_vl:Qwen3VLModel",
    )
    patch_class = QwenVLPatch

    def classes(self) -> dict[str, Any]:
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q25
        from transformers.models.qwen2_vl import modeling_qwen2_vl as q2
        from transformers.models.qwen3_vl import modeling_qwen3_vl as q3

        inner = (q2.Qwen2VLModel, q25.Qwen2_5_VLModel, q3.Qwen3VLModel)
        return {"inner": inner, "deepstack": (q3.Qwen3VLModel,)}

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        if not isinstance(patch, QwenVLPatch):
            raise TypeError("the Qwen-VL adapter needs a QwenVLPatch (use turbo_adapters.apply)")
        classes = self.classes()
        inner = model if isinstance(model, classes["inner"]) else model.model
        layers = list(inner.language_model.layers)
        patch.num_text_layers = len(layers)
        patch.connector_available = True
        deepstack = 0
        if isinstance(inner, classes["deepstack"]):
            deepstack = len(inner.config.vision_config.deepstack_visual_indexes)
            patch.tower_refusal = TOWER_REFUSAL
        elif (why := tower_support(inner.visual)) is not None:
            patch.tower_refusal = f"the installed transformers' Qwen tower differs: {why}"
        else:
            install_tower(patch, inner.visual)
            patch.tower_depth = len(inner.visual.blocks)
            patch.tower_available = True
        patch.first_llm_layer = deepstack
        # log(size) of connector-merged tokens in the decoder's attention
        install_size_bias(patch, [layer.self_attn for layer in layers], inner.language_model.config)
        try:
            check_decoder(patch.adapter_name, inner.language_model, layers)
            install_decoder_layers(patch, layers)
        except IncompatibleLibraryError as refusal:
            patch.llm_refusal = refusal
        patch.modes = "connector"
        install_positions(patch, inner)
        self._install_entries(patch, model, inner, deepstack)

    def _install_entries(
        self, patch: QwenVLPatch, model: nn.Module, inner: nn.Module, deepstack: int
    ) -> None:
        image_token = int(inner.config.image_token_id)
        video_token = int(inner.config.video_token_id)

        def tower_shrink(named: dict[str, Any]) -> tuple[dict[str, Any], Kept | None]:
            """Tower mode: encode the images reducing in the tower, cut the runs; the kept
            indices per image (videos pass through unreduced)."""
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            if named.get("pixel_values") is None:
                return named, None
            grid = named["image_grid_thw"]
            merge = int(inner.visual.spatial_merge_size) ** 2
            tokens = [int(n) for n in (grid.prod(-1) // merge).tolist()]
            check_call(named, tokens, image_token)
            encoded = dict(named.get("mm_encoder_outputs") or {})
            with module_weights(inner):
                with tower_call(inner.visual, patch.tower, patch.tower_budget()):
                    pixels = named["pixel_values"].type(inner.visual.dtype)
                    kept = inner.visual(pixels, grid_thw=grid)
                if named.get("pixel_values_videos") is not None:
                    warnings.warn(
                        "tower mode reduces Qwen-VL's images only: this call's video tokens "
                        "pass through unreduced",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                    encoded["video"] = inner.get_video_features(
                        named["pixel_values_videos"], named["video_grid_thw"], return_dict=True
                    )
            done = cut_call(
                patch, named, tokens, kept, image_token, _pad_id(model), patch.tower.size_bias
            )
            named = done.named
            encoded["image"] = BaseModelOutputWithPooling(
                pooler_output=tuple(k.tokens for k in kept)
            )
            named.pop("pixel_values")
            named.pop("pixel_values_videos", None)
            named["mm_encoder_outputs"] = encoded
            named["position_ids"] = None  # recomputed for the shortened prompt
            return named, ([k.index for k in kept], None)

        def shrink(named: dict[str, Any]) -> tuple[dict[str, Any], Kept | None]:
            """Connector mode: encode, reduce, cut the runs; the kept indices per image
            and per video (tower mode: :func:`tower_shrink`)."""
            modes = patch.active_modes()
            if "tower" in modes:
                return tower_shrink(named)
            if "connector" not in modes:
                return named, None
            images = named.get("pixel_values") is not None
            videos = named.get("pixel_values_videos") is not None
            if not images and not videos:
                return named, None  # nothing to reduce
            ids = named.get("input_ids")
            if videos and deepstack and ids is not None:
                check_frame_runs(ids, video_token, named["video_grid_thw"])
            with module_weights(inner):
                image_out = (
                    inner.get_image_features(
                        named["pixel_values"], named["image_grid_thw"], return_dict=True
                    )
                    if images
                    else None
                )
                # encoded here even when they pass through: the model takes either pixels
                # or encoder outputs, never both
                video_out = (
                    inner.get_video_features(
                        named["pixel_values_videos"], named["video_grid_thw"], return_dict=True
                    )
                    if videos
                    else None
                )
            reduce_videos = video_out is not None
            image_features = list(image_out.pooler_output) if image_out is not None else []
            groups = [VisualGroup(False, j) for j in range(len(image_features))]
            features = image_features
            if reduce_videos and ids is not None:  # (no ids: reduce_call says what it needs)
                groups, features = visual_groups(
                    ids, image_token, video_token, image_features,
                    list(video_out.pooler_output), named["video_grid_thw"],
                )  # fmt: skip
                named = {**named, "input_ids": unify_placeholders(ids, image_token, video_token)}
            guide = resolve_guide(patch.connector.guide, (), "mean", "qwen-vl")
            done = reduce_call(
                patch, patch.connector, named, features, image_token,
                _pad_id(model), embed=inner.get_input_embeddings(), guide=guide,
            )  # fmt: skip
            named = done.named
            if reduce_videos and ids is not None:  # the real ids at the kept columns
                short = named["input_ids"]
                columns = done.shortened.columns.to(ids.device)
                named["input_ids"] = torch.where(
                    short == image_token, ids.gather(1, columns), short
                )
            images_kept = {g.item: k for g, k in zip(groups, done.kept, strict=True) if not g.video}
            index = [images_kept[j].index for j in range(len(image_features))]
            encoded = dict(named.get("mm_encoder_outputs") or {})
            if image_out is not None:
                image_out = copy.copy(image_out)
                image_out.pooler_output = tuple(
                    images_kept[j].tokens for j in range(len(image_features))
                )
                if getattr(image_out, "deepstack_features", None) is not None:
                    image_out.deepstack_features = [
                        tuple(f[i.to(f.device)] for f, i in zip(level, index, strict=True))
                        for level in image_out.deepstack_features
                    ]
                encoded["image"] = image_out
                named.pop("pixel_values")
            kept_videos = None
            if video_out is not None:
                tokens, kept_videos = per_video(
                    groups, [k.tokens for k in done.kept], [k.index for k in done.kept],
                    len(video_out.pooler_output),
                )  # fmt: skip
                video_out = copy.copy(video_out)
                video_out.pooler_output = tuple(tokens)
                if getattr(video_out, "deepstack_features", None) is not None:
                    video_out.deepstack_features = [
                        tuple(f[i.to(f.device)] for f, i in zip(level, kept_videos, strict=True))
                        for level in video_out.deepstack_features
                    ]
                if deepstack:  # M-RoPE numbers Qwen3-VL's frame groups one by one
                    kept_videos = [
                        k.index for g, k in zip(groups, done.kept, strict=True) if g.video
                    ]
                encoded["video"] = video_out
                named.pop("pixel_values_videos")
            named["mm_encoder_outputs"] = encoded
            named["position_ids"] = None  # recomputed for the shortened prompt
            return named, (index, kept_videos)

        def check_llm(modes: frozenset[str]) -> None:
            if "llm" in modes and patch.llm.layer < deepstack:
                raise ValueError(
                    f"llm layer must be >= {deepstack} on Qwen3-VL (its deepstack adds image "
                    f"features at decoder layers 0..{deepstack - 1}), got {patch.llm.layer}"
                )

        def inner_forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with mode_scope(patch, kwargs) as modes:
                check_llm(modes)
                named, kept = shrink(bind_arguments(original, args, kwargs))
                ids = named.get("input_ids")
                image_mask = ids == image_token if "llm" in modes and ids is not None else None
                call = start_call(patch.llm, named, image_mask, inner.language_model.config)
                if kept is None:
                    return forward_in_call(call, original, named)
                with kept_positions(*kept):
                    return forward_in_call(call, original, named)

        patch.override(inner, "forward", inner_forward)
        if inner is model:
            return

        def outer_forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with mode_scope(patch, kwargs) as modes:
                check_llm(modes)
                named, kept = shrink(bind_arguments(original, args, kwargs))
                if kept is None:
                    return original(**named)
                with kept_positions(*kept):
                    return original(**named)

        patch.override(model, "forward", outer_forward)

        def generate_shrink(
            named: dict[str, Any],
        ) -> tuple[dict[str, Any], contextlib.AbstractContextManager[Any]]:
            named, kept = shrink(named)
            return named, kept_positions(*(kept or ([], None)))

        def generate(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return shrunk_generate(
                patch,
                original,
                args,
                kwargs,
                generate_shrink,
                stages=frozenset({"tower", "connector"}),
                check=check_llm,
                media=("pixel_values", "pixel_values_videos"),
            )

        patch.override(model, "generate", generate)
