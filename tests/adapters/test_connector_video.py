"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL videos at the connector stage: each frame group (temporal
patch) reduced like an image, against the unpatched model fed a hand-built oracle (the
shortened prompt, the method's tokens, Qwen3-VL's deepstack features cut with the same
indices, the FULL prompt's M-RoPE positions at the kept columns). Qwen3-VL prompts write
each frame group in a run of its own after its timestamp, as its processor does."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from support import connector_methods as cm
from support import tiny_llava as tl
from support import tiny_qwen_vl as tq

import turbo_adapters as ta
from turbo_adapters.connector import ConnectorReduction, connector_counts, last_connector
from turbo_adapters.families.qwen_vl.video import placeholder_order
from turbo_core.connector import ConnectorInputs

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 4
VIDEO_KINDS = tq.KINDS
#: two rows: an image then a 2-frame-group video; a video alone (different lengths)
MEDIA = [
    [("image", (1, 4, 6)), ("video", (2, 4, 4))],
    [("video", (3, 2, 4))],
]
FRACTION = 0.5


def _feed(kind: str, media: list, seed: int = 1) -> dict:
    return tq.feed_media(media, seed=seed, frame_runs=kind == "qwen3_vl")


def _cut_deepstack(output: Any, kept: list[torch.Tensor]) -> None:
    """Qwen3-VL: every item's deepstack features at its kept indices (in place)."""
    if getattr(output, "deepstack_features", None) is not None:
        output.deepstack_features = [
            tuple(f[i] for f, i in zip(level, kept, strict=True))
            for level in output.deepstack_features
        ]


def _types(ids: torch.Tensor) -> torch.Tensor:
    return (ids == tq.IMG).long() + 2 * (ids == tq.VIDEO).long()


def _strided(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    reduced = cm.keep_strided(ConnectorInputs(features[None]), k)
    return reduced.tokens[0], reduced.index[0]


def _oracle(model: Any, feed: dict[str, Any], fraction: float) -> tuple[dict, torch.Tensor, list]:
    """The unpatched model's inputs for the reduced call, built by hand: every image and
    every frame group keeps ``ceil(fraction * n)`` strided tokens (the test method)."""
    inner = model.model
    with torch.no_grad():
        images = inner.get_image_features(
            feed["pixel_values"], feed["image_grid_thw"], return_dict=True
        )
        videos = inner.get_video_features(
            feed["pixel_values_videos"], feed["video_grid_thw"], return_dict=True
        )
        full, _ = inner.get_rope_index(
            feed["input_ids"], feed["mm_token_type_ids"], image_grid_thw=feed["image_grid_thw"],
            video_grid_thw=feed["video_grid_thw"], attention_mask=feed["attention_mask"],
        )  # fmt: skip
    kept = {"image": [], "video": []}  # per item: (tokens, index)
    for f in images.pooler_output:
        kept["image"].append(_strided(f, math.ceil(fraction * f.shape[0])))
    for f, (t, _h, _w) in zip(videos.pooler_output, feed["video_grid_thw"].tolist(), strict=True):
        n = f.shape[0] // t
        parts = [_strided(f[i * n : (i + 1) * n], math.ceil(fraction * n)) for i in range(t)]
        kept["video"].append(
            (
                torch.cat([p[0] for p in parts]),
                torch.cat([p[1] + i * n for i, p in enumerate(parts)]),
            )
        )
    sizes = {"image": [f.shape[0] for f in images.pooler_output],
             "video": [f.shape[0] for f in videos.pooler_output]}  # fmt: skip
    images, videos = copy.copy(images), copy.copy(videos)
    images.pooler_output = tuple(t for t, _ in kept["image"])
    videos.pooler_output = tuple(t for t, _ in kept["video"])
    _cut_deepstack(images, [i for _, i in kept["image"]])
    _cut_deepstack(videos, [i for _, i in kept["video"]])
    # placeholders row-major: each item's tokens in order, over one run or (Qwen3-VL
    # videos) one run per frame group
    prompts, columns, at, group_tokens = [], [], {"image": [0, 0], "video": [0, 0]}, []
    for row in range(feed["input_ids"].shape[0]):
        keep = []
        for c in feed["attention_mask"][row].nonzero().squeeze(-1).tolist():
            token = int(feed["input_ids"][row, c])
            if token not in (tq.IMG, tq.VIDEO):
                keep.append(c)
                continue
            kind = "image" if token == tq.IMG else "video"
            item, offset = at[kind]
            if offset in set(kept[kind][item][1].tolist()):
                keep.append(c)
            at[kind] = [item, offset + 1] if offset + 1 < sizes[kind][item] else [item + 1, 0]
        prompts.append(feed["input_ids"][row, keep].tolist())
        columns.append(keep)
    ids, mask = tl.left_pad(prompts)
    positions = torch.zeros(3, *ids.shape, dtype=torch.long)
    for row, keep in enumerate(columns):
        positions[:, row, ids.shape[1] - len(keep) :] = full[:, row, keep]
    oracle = {
        "input_ids": ids, "attention_mask": mask, "mm_token_type_ids": _types(ids),
        "mm_encoder_outputs": {"image": images, "video": videos}, "position_ids": positions,
    }  # fmt: skip
    for media in MEDIA:  # images and frame groups in prompt order: what the stage counts
        for kind, (t, h, w) in media:
            n = h * w // tq.MERGE**2
            group_tokens += [n] if kind == "image" else [n] * t
    return oracle, positions, group_tokens


def _greedy(model: Any, oracle: dict, positions: torch.Tensor) -> torch.Tensor:
    """Greedy decoding of the oracle's prompt, one token at a time on its cache: new tokens
    (text, whatever their id: a generated placeholder id is not an image) take the
    positions after each row's highest prompt position."""
    mask = oracle["attention_mask"]
    nxt = positions.amax(dim=(0, 2)) + 1
    out = []
    with torch.no_grad():
        step = model(**oracle, use_cache=True)
        for i in range(NEW):
            token = step.logits[:, -1].argmax(-1)
            out.append(token)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            step = model(
                input_ids=token[:, None], attention_mask=mask, cache=step.cache,
                position_ids=(nxt + i).view(1, -1, 1).expand(3, -1, 1), use_cache=True,
            )  # fmt: skip
    return torch.stack(out, 1)


def _positions_seen(model: Any) -> tuple[dict[str, torch.Tensor], Any]:
    seen: dict[str, torch.Tensor] = {}

    def hook(module: Any, args: Any, kwargs: dict) -> None:
        seen.setdefault("positions", kwargs["position_ids"])

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_video_keep_all_equals_the_unpatched_model(kind: str) -> None:
    model = tq.build(kind)
    feed = _feed(kind, MEDIA)
    with torch.no_grad():
        ref_logits = model(**feed).logits
        ref = model.generate(**feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=1.0)
    with torch.no_grad():
        got_logits = model(**feed).logits
        got = model.generate(**feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(got, ref)
    record = last_connector(patch)
    assert record.tokens_out == record.tokens_in and len(record.tokens_in) == 6  # 1 + 2 + 3


@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_video_kept_half_equals_the_oracle_with_kept_positions(kind: str) -> None:
    model = tq.build(kind)
    feed = _feed(kind, MEDIA)
    oracle, positions, group_tokens = _oracle(model, feed, FRACTION)
    with torch.no_grad():
        want_logits = model(**oracle).logits
    want = _greedy(model, oracle, positions)
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=FRACTION, method=cm.STRIDED, size_bias=False)
    seen, handle = _positions_seen(model)
    with torch.no_grad():
        got_logits = model(**feed).logits
    handle.remove()
    valid = oracle["attention_mask"].bool()
    # M-RoPE: the kept columns carry the full prompt's own positions
    assert torch.equal(seen["positions"][-3:][:, valid], positions[:, valid])
    torch.testing.assert_close(got_logits[valid], want_logits[valid], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        got = model.generate(**feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert torch.equal(got[:, feed["input_ids"].shape[1] :], want)
    # counts known in advance: the budget rule per image and per frame group
    assert last_connector(patch).tokens_out == tuple(connector_counts(FRACTION, group_tokens))
    assert oracle["input_ids"].shape[1] < feed["input_ids"].shape[1]


def _language_model_inputs(model: Any) -> tuple[dict[str, Any], Any]:
    seen: dict[str, Any] = {}

    def hook(module: Any, args: Any, kwargs: dict) -> None:
        if kwargs.get("deepstack_visual_embeds") is not None:
            seen.setdefault("mask", kwargs["visual_pos_masks"])
            seen.setdefault("deepstack", kwargs["deepstack_visual_embeds"])

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_qwen3_vl_video_deepstack_is_cut_with_the_kept_indices() -> None:
    """What Qwen3-VL's decoder layers add at the visual positions: the unpatched model's
    image and video deepstack features, cut by hand at the strided indices of every image
    and frame group (the oracle), in the shortened prompt's placeholder order."""
    model = tq.build("qwen3_vl")
    feed = _feed("qwen3_vl", MEDIA)
    oracle, _, _ = _oracle(model, feed, FRACTION)
    seen, handle = _language_model_inputs(model)
    with torch.no_grad():
        model(**feed)
        full = [level.shape[0] for level in seen.pop("deepstack")]
        seen.clear()
        model(**oracle)
    want_mask, want = seen.pop("mask"), seen.pop("deepstack")
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=FRACTION, method=cm.STRIDED, size_bias=False)
    seen.clear()
    with torch.no_grad():
        model(**feed)
    handle.remove()
    assert len(seen["deepstack"]) == len(want) == 2  # deepstack_visual_indexes [0, 1]
    assert torch.equal(seen["mask"], want_mask)
    for got, expected, n in zip(seen["deepstack"], want, full, strict=True):
        assert got.shape[0] == int(want_mask.sum()) < n
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_qwen3_vl_video_in_one_run_is_refused() -> None:
    """A Qwen3-VL video written as one run (Qwen2.5-VL's layout): M-RoPE numbers Qwen3-VL's
    runs one per frame group, so kept tokens could not be placed; refused with the reason."""
    model = tq.build("qwen3_vl")
    feed = tq.feed_media([[("image", (1, 4, 4)), ("video", (2, 4, 4))]])
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=0.5)
    refused = pytest.raises(ValueError, match=r"1 runs of video placeholders but the videos have 2")
    with refused, torch.no_grad():
        model(**feed)


@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_video_batch_rows_equal_single_rows(kind: str) -> None:
    """Rows of images and videos, reduced in one batch, equal each row alone (logits at the
    last position, greedy tokens, counts)."""
    model = tq.build(kind)
    rows = [_feed(kind, [media], seed=30 + r) for r, media in enumerate(MEDIA)]
    prompts = [f["input_ids"][0][f["attention_mask"][0].bool()].tolist() for f in rows]
    ids, mask = tl.left_pad(prompts)
    batch = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": _types(ids)}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [f[key] for f in rows if key in f]
        if parts:
            batch[key] = torch.cat(parts)
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=0.5)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        tokens = model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    counts = last_connector(patch).tokens_out
    assert sum(counts) < sum(last_connector(patch).tokens_in)
    singles = []
    for b, one in enumerate(rows):
        with torch.no_grad():
            alone = model(**one).logits[:, -1]
            out = model.generate(**one, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        singles += last_connector(patch).tokens_out
        torch.testing.assert_close(alone[0], logits[b], atol=1e-4, rtol=1e-4)
        assert torch.equal(out[0, one["input_ids"].shape[1] :], tokens[b, ids.shape[1] :])
    assert tuple(singles) == counts


def test_placeholders_that_do_not_match_the_media_are_refused() -> None:
    feed = tq.feed_media(MEDIA)
    ids = feed["input_ids"]
    order = placeholder_order(ids, tq.IMG, tq.VIDEO, [6], [8, 6])
    assert order == [(False, 0), (True, 0), (True, 1)]
    with pytest.raises(ValueError, match="video placeholders but"):
        placeholder_order(ids, tq.IMG, tq.VIDEO, [6], [8, 5])
    mixed = torch.tensor([[1, tq.IMG, tq.VIDEO, tq.IMG, tq.VIDEO, 2]])
    with pytest.raises(ValueError, match="interleaved"):
        placeholder_order(mixed, tq.IMG, tq.VIDEO, [2], [2])


@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_video_only_prompts_run_with_counts_known_in_advance(kind: str) -> None:
    """Videos without images, Turbo's own method and a count per frame group: forward and
    generate run, every frame group keeps the budget, the prompt shrinks by the rest."""
    model = tq.build(kind)
    feed = _feed(kind, [[("video", (2, 4, 6))], [("video", (1, 4, 4))]])
    feed = {k: v for k, v in feed.items() if k not in ("pixel_values", "image_grid_thw")}
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=2)
    with torch.no_grad():
        logits = model(**feed).logits
        out = model.generate(**feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    record = last_connector(patch)
    assert record.tokens_in == (6, 6, 4)
    assert record.tokens_out == tuple(connector_counts(2, [6, 6, 4])) == (2, 2, 2)
    lengths = feed["attention_mask"].sum(1).tolist()  # rows drop 12 - 4 and 4 - 2 tokens
    assert logits.shape[1] == max(lengths[0] - 8, lengths[1] - 2)
    assert torch.isfinite(logits).all() and out.shape[1] == feed["input_ids"].shape[1] + NEW


def _run(model: Any, feed: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(**feed).logits[:, -1]
        out = model.generate(**feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    return logits, out


@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_video_remove_restores_exactly(kind: str) -> None:
    model = tq.build(kind)
    feed = _feed(kind, MEDIA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref_logits, ref = _run(model, feed)
    dicts = [set(m.__dict__) for m in model.modules()]  # after transformers' first-call hooks
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=FRACTION)
    logits, _ = _run(model, feed)
    assert not torch.allclose(logits, ref_logits, atol=1e-6)  # the stage acted
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ta.remove(model)
    got_logits, got = _run(model, feed)
    assert torch.equal(got_logits, ref_logits) and torch.equal(got, ref)
    assert [set(m.__dict__) for m in model.modules()] == dicts
    assert ta.handle_of(model) is None


@pytest.mark.parametrize("kind", VIDEO_KINDS)
def test_video_under_accelerate_hooks(kind: str) -> None:
    """cpu_offload before and after apply: the patched model's logits, greedy tokens and
    counts as without hooks; remove() leaves every hook as it was, with the unpatched
    logits and tokens."""
    pytest.importorskip("accelerate")
    from accelerate import cpu_offload
    from support.accelerate_hooks import hooks_of

    feed = _feed(kind, MEDIA)
    model = tq.build(kind)
    ref_logits, ref = _run(model, feed)
    patch = ta.apply(model)
    patch.connector = ConnectorReduction(budget=FRACTION)
    want_logits, want = _run(model, feed)
    counts = last_connector(patch).tokens_out
    ta.remove(model)
    for hooks_first in (True, False):
        model = tq.build(kind)
        if hooks_first:
            cpu_offload(model, execution_device=torch.device("cpu"))
        patch = ta.apply(model)
        patch.connector = ConnectorReduction(budget=FRACTION)
        if not hooks_first:
            cpu_offload(model, execution_device=torch.device("cpu"))
        hooks = hooks_of(model)
        assert hooks
        logits, out = _run(model, feed)
        torch.testing.assert_close(logits, want_logits, atol=1e-6, rtol=1e-6)
        assert torch.equal(out, want) and last_connector(patch).tokens_out == counts
        ta.remove(model)
        assert hooks_of(model) == hooks
        logits, out = _run(model, feed)
        torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-6)
        assert torch.equal(out, ref)
