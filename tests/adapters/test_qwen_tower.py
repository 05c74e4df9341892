"""Qwen2-VL / Qwen2.5-VL tower stage: whole 2x2 units merged inside the vision tower.

Against the unpatched model (keeping everything), an independent float64 oracle (a
per-window loop over the same blocks: windows, counts, keys, ranking and the slot-wise
size-weighted merge all written here), and the unpatched model fed the tower's kept tokens
with the full prompt's M-RoPE positions at the kept columns.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import torch

pytest.importorskip("transformers")

from support import tiny_llava as tl
from support import tiny_qwen_vl as tq

import turbo_adapters as ta
from turbo_adapters.connector import ConnectorReduction, connector_counts, last_connector
from turbo_adapters.families.llava.llm import LLMReduction
from turbo_adapters.families.qwen_vl import QwenTowerReduction
from turbo_adapters.families.qwen_vl.tower import tower_call

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ("qwen2_vl", "qwen2_5_vl")
NEW = 4
#: row 0: one image of 5 x 7 units (Qwen2.5's 2x2-unit windows: edge windows on both
#: axes); row 1: two images, 3 x 4 and 2 x 3 units
GRIDS = [[(1, 10, 14)], [(1, 6, 8), (1, 4, 6)]]


def _units(grids) -> list[int]:
    return [h * w // 4 for g in grids for _, h, w in g]


def _windows(visual, h: int, w: int) -> list[list[int]]:
    """The raster unit indices of each attention window of an image of h x w patches, in
    the tower's window order (one window per image without windows)."""
    rows, cols = h // 2, w // 2
    if not hasattr(visual, "fullatt_block_indexes"):
        return [list(range(rows * cols))]
    side = visual.window_size // 2 // visual.patch_size
    out = []
    for wy in range(0, rows, side):
        for wx in range(0, cols, side):
            out.append(
                [
                    y * cols + x
                    for y in range(wy, min(wy + side, rows))
                    for x in range(wx, min(wx + side, cols))
                ]
            )
    return out


def _shares(sizes: list[int], kept: int) -> list[int]:
    """One unit per window, the rest by largest remainder in proportion to size - 1."""
    if kept >= sum(sizes):
        return list(sizes)
    extra = kept - len(sizes)
    quota = [Fraction(extra * (s - 1), sum(sizes) - len(sizes)) for s in sizes]
    base = [int(q) for q in quota]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(quota[i] - base[i]), i))
    for i in by_remainder[: extra - sum(base)]:
        base[i] += 1
    return [1 + b for b in base]


def _oracle(visual, pixels, grids, budget, layers, similarity="keys", mutate=None):
    """The tower stage written out per window in float64: per image (tokens, index, sizes).

    ``mutate``: "rotary" averages the merged units' rotary rows, "unweighted" ignores the
    sizes in the merge (the oracle test must notice either)."""
    unit_rows, depth = 4, len(visual.blocks)
    full = set(getattr(visual, "fullatt_block_indexes", range(depth)))
    hidden = visual.patch_embed(pixels.double())
    width = hidden.shape[-1]
    windows = []  # per window: dict of rows (n, 4, C), cos, sin, ids, sizes, image
    start = 0
    units = _units([grids])
    counts = connector_counts(budget, units)
    for j, (_, h, w) in enumerate(grids):
        cols = w // 2
        pos = torch.tensor(
            [[2 * (u // cols) + r // 2, 2 * (u % cols) + r % 2] for u in range(h * w // 4)
             for r in range(4)]
        )  # fmt: skip
        mine = hidden[start * 4 : (start + units[j]) * 4]
        cos, sin = visual.rotary_pos_emb(mine, pos)
        parts = _windows(visual, h, w)
        shares = _shares([len(p) for p in parts], counts[j])
        for part, share in zip(parts, shares, strict=True):
            rows = torch.stack([mine[4 * u : 4 * u + 4] for u in part])
            windows.append({
                "rows": rows, "cos": torch.stack([cos[4 * u : 4 * u + 4] for u in part]).double(),
                "sin": torch.stack([sin[4 * u : 4 * u + 4] for u in part]).double(),
                "ids": list(part), "sizes": [1.0] * len(part), "image": j,
                "n": len(part), "k": share,
            })  # fmt: skip
        start += units[j]
    for layer, block in enumerate(visual.blocks):
        x = torch.cat([wd["rows"].reshape(-1, width) for wd in windows])
        if layer in full:
            lengths = [sum(len(wd["ids"]) for wd in windows if wd["image"] == j) * unit_rows
                       for j in range(len(grids))]  # fmt: skip
        else:
            lengths = [len(wd["ids"]) * unit_rows for wd in windows]
        cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        cos = torch.cat([wd["cos"].reshape(-1, wd["cos"].shape[-1]) for wd in windows])
        sin = torch.cat([wd["sin"].reshape(-1, wd["sin"].shape[-1]) for wd in windows])
        keys = block.attn.qkv(block.norm1(x))[:, width : 2 * width]
        keys = keys.reshape(x.shape[0], block.attn.num_heads, -1).mean(1)
        x = block(x, cu_seqlens=cu, position_embeddings=(cos, sin))
        at = 0
        for wd in windows:
            n = len(wd["ids"])
            wd["rows"] = x[at * 4 : (at + n) * 4].reshape(n, 4, width)
            wd["keys"] = keys[at * 4 : (at + n) * 4].reshape(n, 4, -1)
            at += n
        if layer not in layers:
            continue
        step = layers.index(layer)
        for wd in windows:
            target = wd["n"] - (wd["n"] - wd["k"]) * (step + 1) // len(layers)
            n = len(wd["ids"])
            if target == n:
                continue
            d = wd["keys"].mean(1) if similarity == "keys" else wd["rows"].mean(1)
            d = d / d.norm(dim=-1, keepdim=True)
            sim = (d @ d.T).tolist()
            redundancy = [max(sim[i][j] for j in range(n) if j != i) if n > 1 else -1e9
                          for i in range(n)]  # fmt: skip
            keep = sorted(sorted(range(n), key=lambda i: (redundancy[i], i))[:target])
            groups = {k: [k] for k in keep}
            for i in range(n):
                if i in groups:
                    continue
                best = keep[0]
                for k in keep[1:]:
                    if sim[i][k] > sim[i][best]:
                        best = k
                groups[best].append(i)
            rows, cosr, sinr, sizes = [], [], [], []
            for k in keep:
                weight = [wd["sizes"][i] if mutate != "unweighted" else 1.0 for i in groups[k]]
                total = sum(weight)
                rows.append(sum(wd["rows"][i] * wt for i, wt in zip(groups[k], weight, strict=True))
                            / total)  # fmt: skip
                if mutate == "rotary":
                    cosr.append(sum(wd["cos"][i] for i in groups[k]) / len(groups[k]))
                    sinr.append(sum(wd["sin"][i] for i in groups[k]) / len(groups[k]))
                else:
                    cosr.append(wd["cos"][k])
                    sinr.append(wd["sin"][k])
                sizes.append(sum(wd["sizes"][i] for i in groups[k]))
            wd["rows"], wd["cos"], wd["sin"] = (
                torch.stack(rows),
                torch.stack(cosr),
                torch.stack(sinr),
            )
            wd["ids"], wd["sizes"] = [wd["ids"][k] for k in keep], sizes
    merged = visual.merger(torch.cat([wd["rows"].reshape(-1, width) for wd in windows]))
    out, at = [], 0
    per_image: list[list[tuple[int, torch.Tensor, float]]] = [[] for _ in grids]
    for wd in windows:
        for i, u in enumerate(wd["ids"]):
            per_image[wd["image"]].append((u, merged[at + i], wd["sizes"][i]))
        at += len(wd["ids"])
    for entries in per_image:
        entries.sort(key=lambda e: e[0])
        out.append((
            torch.stack([e[1] for e in entries]), torch.tensor([e[0] for e in entries]),
            torch.tensor([e[2] for e in entries]),
        ))  # fmt: skip
    return out


def _patched_tower(model, feed, settings):
    """The patched tower's kept tokens per image (``settings.budget`` set)."""
    with torch.no_grad(), tower_call(model.model.visual, settings, settings.budget):
        return model.model.visual(feed["pixel_values"], grid_thw=feed["image_grid_thw"])


# ------------------------------------------------------------------ (a) keep-all
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("budget", [1.0, 1000])
def test_keeping_everything_is_the_unpatched_model(kind, budget) -> None:
    model = tq.build(kind)
    feed = tq.feed(GRIDS)
    with torch.no_grad():
        want = model(**feed).logits
        want_ids = model.generate(**feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    patch = ta.apply(model)
    patch.tower = QwenTowerReduction(budget=budget, layers=(0, 1))
    with torch.no_grad():
        got = model(**feed, turbo_mode="tower").logits
        got_ids = model.generate(
            **feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, turbo_mode="tower"
        )
    assert torch.equal(got, want)
    assert torch.equal(got_ids, want_ids)
    assert last_connector(patch).tokens_out == tuple(_units(GRIDS))


# ------------------------------------------------------------------ (b) oracle, (h) mutations
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("budget", "layers", "similarity"),
    [(0.35, (0, 1), "keys"), (13, (1, 2), "hidden"), (0.5, (0, 1, 2), "keys")],
)
def test_tower_equals_the_float64_per_window_oracle(kind, budget, layers, similarity) -> None:
    model = tq.build(kind).double()
    feed = tq.feed(GRIDS)
    feed["pixel_values"] = feed["pixel_values"].double()
    grids = [g for row in GRIDS for g in row]
    with torch.no_grad():
        want = _oracle(model.model.visual, feed["pixel_values"], grids, budget, list(layers),
                       similarity)  # fmt: skip
    ta.apply(model)
    settings = QwenTowerReduction(budget=budget, layers=layers, similarity=similarity)
    got = _patched_tower(model, feed, settings)
    assert [int(k.index.numel()) for k in got] == connector_counts(budget, _units(GRIDS))
    for k, (tokens, index, sizes) in zip(got, want, strict=True):
        assert torch.equal(k.index, index)
        assert torch.equal(k.sizes.double(), sizes.double())
        torch.testing.assert_close(k.tokens, tokens, atol=1e-10, rtol=1e-10)
    assert any(bool((k.sizes > 1).any()) for k in got)
    assert any(bool((k.sizes > 2).any()) for k in got) or len(layers) < 3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mutate", ["rotary", "unweighted"])
def test_the_oracle_comparison_catches_a_mutated_merge(kind, mutate) -> None:
    """A merge that averages rotary rows, or ignores the sizes, is far outside the
    oracle test's tolerance (the comparison above would fail)."""
    model = tq.build(kind).double()
    feed = tq.feed(GRIDS)
    feed["pixel_values"] = feed["pixel_values"].double()
    grids = [g for row in GRIDS for g in row]
    with torch.no_grad():
        wrong = _oracle(model.model.visual, feed["pixel_values"], grids, 0.35, [0, 1, 2],
                        mutate=mutate)  # fmt: skip
    ta.apply(model)
    got = _patched_tower(model, feed, QwenTowerReduction(budget=0.35, layers=(0, 1, 2)))
    gaps = [
        float((k.tokens - w[0]).abs().max())
        for k, w in zip(got, wrong, strict=True)
        if k.tokens.shape == w[0].shape and torch.equal(k.index, w[1])
    ]
    mismatched = len(gaps) < len(got)
    assert mismatched or max(gaps) > 1e-6


# ------------------------------------------------------------------ (c) counts
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("budget", [13, 0.4, (14, 5, 3)])
def test_counts_follow_the_budget_per_image_and_window(kind, budget) -> None:
    model = tq.build(kind)
    feed = tq.feed(GRIDS)
    patch = ta.apply(model)
    patch.tower = QwenTowerReduction(budget=budget, layers=(0, 2))
    with torch.no_grad():
        model(**feed, turbo_mode="tower")
    record = last_connector(patch)
    units = _units(GRIDS)
    assert record.tokens_in == tuple(units)
    assert record.tokens_out == tuple(connector_counts(budget, units))
    grids = [g for row in GRIDS for g in row]
    for (_, h, w), index, sizes, kept in zip(
        grids, record.index, record.sizes, record.tokens_out, strict=True
    ):
        assert float(sizes.sum()) == h * w // 4
        parts = _windows(model.model.visual, h, w)
        per_window = [sum(int(i) in set(p) for i in index) for p in parts]
        assert per_window == _shares([len(p) for p in parts], kept)
    # the same budget through patch.connector (the tower's default budget)
    patch.tower = QwenTowerReduction(layers=(0, 2))
    patch.connector = ConnectorReduction(budget=budget)
    with torch.no_grad():
        model(**feed, turbo_mode="tower")
    assert last_connector(patch).tokens_out == tuple(connector_counts(budget, units))


# ------------------------------------------------------------------ (d) batch = single
def _row(feed: dict, grids: list, b: int) -> dict:
    valid = feed["attention_mask"][b].bool()
    before = sum(t * h * w for row in grids[:b] for t, h, w in row)
    mine = sum(t * h * w for t, h, w in grids[b])
    first = sum(len(row) for row in grids[:b])
    ids = feed["input_ids"][b][valid][None]
    return {
        "input_ids": ids, "attention_mask": torch.ones_like(ids),
        "pixel_values": feed["pixel_values"][before : before + mine],
        "image_grid_thw": feed["image_grid_thw"][first : first + len(grids[b])],
        "mm_token_type_ids": (ids == tq.IMG).long(),
    }  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_batch_rows_equal_single_rows(kind) -> None:
    model = tq.build(kind)
    grids = [[(1, 10, 14)], [(1, 6, 8)]]
    feed = tq.feed(grids)
    patch = ta.apply(model)
    patch.tower = QwenTowerReduction(budget=0.4, layers=(0, 1))
    with torch.no_grad():
        logits = model(**feed, turbo_mode="tower").logits
        ids = model.generate(
            **feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, turbo_mode="tower"
        )
    for b in range(2):
        single = _row(feed, grids, b)
        with torch.no_grad():
            one = model(**single, turbo_mode="tower").logits
            one_ids = model.generate(
                **single, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                turbo_mode="tower",
            )  # fmt: skip
        torch.testing.assert_close(logits[b, -1], one[0, -1], atol=1e-5, rtol=1e-5)
        assert torch.equal(ids[b, -NEW:], one_ids[0, -NEW:])


# ------------------------------------------------------------------ (e) remove
@pytest.mark.parametrize("kind", KINDS)
def test_remove_restores_the_model_exactly(kind) -> None:
    model = tq.build(kind)
    feed = tq.feed(GRIDS)
    visual = model.model.visual
    before = dict(visual.__dict__)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(**feed).logits
    patch = ta.apply(model)
    patch.modes = "tower"
    patch.tower = QwenTowerReduction(budget=0.4, layers=(0,))
    with torch.no_grad():
        cut = model(**feed).logits
    assert cut.shape[1] < want.shape[1]
    patch.remove()
    assert visual.__dict__.keys() == before.keys()
    assert "forward" not in visual.__dict__
    with torch.no_grad():
        assert torch.equal(model(**feed).logits, want)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])


# ------------------------------------------------------------------ (f) positions, generate
def _oracle_inputs(model, feed, kept) -> tuple[dict, torch.Tensor]:
    """The unpatched model's inputs for the tower-reduced call: the prompt cut to the kept
    placeholders, the tower's tokens, the FULL prompt's M-RoPE positions there."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    with torch.no_grad():
        full, _ = model.model.get_rope_index(
            feed["input_ids"], feed["mm_token_type_ids"], image_grid_thw=feed["image_grid_thw"],
            attention_mask=feed["attention_mask"],
        )  # fmt: skip
    sizes = [int(n) for n in (feed["image_grid_thw"].prod(-1) // 4).tolist()]
    prompts, columns, image, run = [], [], 0, 0
    for row in range(feed["input_ids"].shape[0]):
        keep = []
        for c in feed["attention_mask"][row].nonzero().squeeze(-1).tolist():
            if int(feed["input_ids"][row, c]) == tq.IMG:
                if run in set(kept[image].index.tolist()):
                    keep.append(c)
                run += 1
                if run == sizes[image]:
                    run, image = 0, image + 1
            else:
                keep.append(c)
        prompts.append(feed["input_ids"][row, keep].tolist())
        columns.append(keep)
    ids, mask = tl.left_pad(prompts)
    positions = torch.zeros(3, *ids.shape, dtype=torch.long)
    for row, keep in enumerate(columns):
        positions[:, row, ids.shape[1] - len(keep) :] = full[:, row, keep]
    image_out = BaseModelOutputWithPooling(pooler_output=tuple(k.tokens for k in kept))
    oracle = {
        "input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == tq.IMG).long(),
        "mm_encoder_outputs": {"image": image_out}, "position_ids": positions,
    }  # fmt: skip
    return oracle, positions


def _greedy(model, oracle: dict, positions: torch.Tensor) -> torch.Tensor:
    """Greedy decoding by full recomputation: new tokens after each row's highest position."""
    ids, mask = oracle["input_ids"], oracle["attention_mask"]
    nxt = positions.amax(dim=(0, 2)) + 1
    out = []
    for step in range(NEW):
        feed = {**oracle, "input_ids": ids, "attention_mask": mask, "position_ids": positions,
                "mm_token_type_ids": (ids == tq.IMG).long()}  # fmt: skip
        with torch.no_grad():
            token = model(**feed).logits[:, -1].argmax(-1)
        out.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = torch.cat([positions, (nxt + step).view(1, -1, 1).expand(3, -1, 1)], 2)
    return torch.stack(out, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_text_after_the_image_keeps_its_positions_in_forward_and_generate(kind) -> None:
    model = tq.build(kind)
    feed = tq.feed(GRIDS)
    patch = ta.apply(model)
    settings = QwenTowerReduction(budget=0.4, layers=(0, 1), size_bias=False)
    kept = _patched_tower(model, feed, settings)
    oracle, positions = _oracle_inputs(model, feed, kept)
    patch.remove()  # the oracle runs on the unpatched model
    with torch.no_grad():
        want_logits = model(**copy.copy(oracle)).logits
    want = _greedy(model, oracle, positions)
    patch = ta.apply(model)
    patch.tower = settings
    patch.modes = "tower"
    with torch.no_grad():
        got_logits = model(**feed).logits
        got = model.generate(**feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    valid = oracle["attention_mask"].bool()
    torch.testing.assert_close(got_logits[valid], want_logits[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, : feed["input_ids"].shape[1]], feed["input_ids"])
    assert torch.equal(got[:, feed["input_ids"].shape[1] :], want)


@pytest.mark.parametrize("kind", KINDS)
def test_tower_with_llm_mode_and_the_size_bias(kind) -> None:
    """tower + llm: LLM mode keeping everything is the tower stage alone; keeping half
    changes the answer and generate runs; the merged sizes reach the decoder."""
    model = tq.build(kind, layers=4)
    feed = tq.feed(GRIDS)
    patch = ta.apply(model)
    patch.tower = QwenTowerReduction(budget=0.4, layers=(0,), size_bias=False)
    patch.llm = LLMReduction(layer=2, keep=1.0)
    with torch.no_grad():
        plain = model(**feed, turbo_mode="tower").logits[:, -1]
        both = model(**feed, turbo_mode="both").logits[:, -1]
        torch.testing.assert_close(both, plain, atol=1e-5, rtol=1e-5)
        patch.llm = LLMReduction(layer=2, keep=0.5)
        half = model(**feed, turbo_mode={"tower", "llm"}).logits[:, -1]
        out = model.generate(**feed, max_new_tokens=NEW, do_sample=False, turbo_mode="both")
        patch.tower = QwenTowerReduction(budget=0.4, layers=(0,))
        biased = model(**feed, turbo_mode="tower").logits[:, -1]
    assert not torch.allclose(half, plain, atol=1e-4)
    assert out.shape[1] == feed["input_ids"].shape[1] + NEW
    assert not torch.equal(biased, plain)  # merged sizes enter the decoder's attention


# ------------------------------------------------------------------ (g) bad settings
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": ()}, "layers"), ({"layers": (2, 1)}, "layers"), ({"layers": (-1,)}, "layers"),
        ({"layers": "0"}, "layers"), ({"layers": (0, 0)}, "layers"), ({"layers": (True,)}, "layers"),
        ({"similarity": "values"}, "similarity"), ({"budget": 0}, "budget"),
        ({"budget": 1.5}, "budget"), ({"size_bias": "yes"}, "size_bias"),
    ],
)  # fmt: skip
def test_bad_settings_name_the_parameter(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        QwenTowerReduction(**kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_calls_are_refused_with_the_reason(kind) -> None:
    model = tq.build(kind)
    feed = tq.feed(GRIDS)
    patch = ta.apply(model)
    with pytest.raises(ValueError, match=r"layers must be in \[0, 2\]"):
        patch.tower = QwenTowerReduction(layers=(1, 3))
    with pytest.raises(TypeError, match="QwenTowerReduction"):
        patch.tower = {"budget": 3}
    with pytest.raises(ValueError, match="'tower' and 'connector'"):
        model(**feed, turbo_mode={"tower", "connector"})
    if kind == "qwen2_5_vl":  # 12 windows in the first image
        patch.tower = QwenTowerReduction(budget=5, layers=(0, 1))
        with pytest.raises(ValueError, match="budget >= 12"):
            model(**feed, turbo_mode="tower")
    embeds = {k: v for k, v in feed.items() if k != "input_ids"}
    embeds["inputs_embeds"] = model.get_input_embeddings()(feed["input_ids"])
    with pytest.raises(ValueError, match="input_ids"):
        model(**embeds, turbo_mode="tower")


def test_qwen3_vl_refuses_the_tower_stage_naming_its_deepstack() -> None:
    patch = ta.apply(tq.build("qwen3_vl"))
    assert not patch.tower_available
    with pytest.raises(ValueError, match="deepstack"):
        patch.modes = "tower"


@pytest.mark.parametrize("kind", KINDS)
def test_videos_pass_through_the_tower_stage_unreduced_with_a_warning(kind) -> None:
    model = tq.build(kind)
    feed = tq.feed_media([[("image", (1, 10, 14)), ("video", (2, 4, 6))]])
    with torch.no_grad():
        want = model(**feed).logits
    patch = ta.apply(model)
    patch.tower = QwenTowerReduction(budget=1.0, layers=(0, 1))
    with pytest.warns(RuntimeWarning, match="video tokens pass through unreduced"), torch.no_grad():
        same = model(**feed, turbo_mode="tower").logits
    assert torch.equal(same, want)  # keeping every image token: the unpatched model
    patch.tower = QwenTowerReduction(budget=0.4, layers=(0, 1))
    with pytest.warns(RuntimeWarning, match="unreduced"), torch.no_grad():
        cut = model(**feed, turbo_mode="tower").logits
    record = last_connector(patch)
    assert record.tokens_in == (35,) and record.tokens_out == (14,)
    assert cut.shape[1] == want.shape[1] - (35 - 14)  # the video's 12 tokens all stay


@pytest.mark.parametrize("grid", [(1, 10, 14), (1, 8, 8), (1, 16, 6), (1, 2, 2), (1, 18, 34)])
def test_the_window_partition_is_the_librarys(grid) -> None:
    from transformers.vision_utils import get_vision_window_index

    from turbo_adapters.families.qwen_vl.tower import _windows

    grids = torch.tensor([grid, (1, 6, 8)])
    want, cu = get_vision_window_index(grids, spatial_merge_size=2, window_size=16, patch_size=4)
    got, lengths = _windows(grids.tolist(), 2, 2, torch.device("cpu"))
    assert torch.equal(got, want)
    assert [4 * n for n in lengths] == (cu[1:] - cu[:-1]).tolist()


def test_a_tower_without_the_expected_parts_is_refused_with_the_reason() -> None:
    model = tq.build("qwen2_5_vl")
    model.model.visual.rotary_pos_emb = torch.nn.Identity()
    patch = ta.apply(model)
    with pytest.raises(ValueError, match="takes no position_ids"):
        patch.modes = "tower"
