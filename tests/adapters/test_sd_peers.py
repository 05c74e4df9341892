"""ToDo and ToMA, the peer methods of the diffusion families, against slow explicit oracles.

Each oracle is written from the paper with Python loops (no code shared with
turbo_adapters.families.stable_diffusion.methods) and compared on real diffusers blocks.
"""

from __future__ import annotations

import math

import pytest
import torch

import turbo_adapters as ta

diffusers = pytest.importorskip("diffusers")

from support.tiny_dit import (  # noqa: E402
    flux_inputs,
    pixart_inputs,
    sd3_inputs,
    tiny_flux,
    tiny_pixart,
    tiny_sd3,
)

from turbo_adapters.families.stable_diffusion.methods import (  # noqa: E402
    facility_location,
    soft_plan,
    tiled_facility_location,
)


def make_unet():
    from turbo_eval.diffusion import tiny_unet_config

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=32))
    return unet.double().eval()


def unet_inputs(batch=2, height=16, width=12):
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(batch, 4, height, width, generator=g, dtype=torch.float64)
    return latent, torch.tensor(10), torch.randn(batch, 7, 32, generator=g, dtype=torch.float64)


def capture_attn1(unet, inputs, **settings):
    """(input, output) of the first block's attn1 in a patched call (after Turbo's hooks)."""
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    seen = {}

    def before(module, args, kwargs):
        seen.setdefault("x", args[0] if args else kwargs["hidden_states"])

    def block_input(module, args, kwargs):
        seen.setdefault("block", args[0] if args else kwargs["hidden_states"])

    def after(module, args, output):
        seen.setdefault("y", output)

    handles = [
        block.attn1.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
        block.register_forward_pre_hook(block_input, with_kwargs=True, prepend=True),
    ]
    with ta.patched(unet, **settings) as patch, torch.no_grad():
        later = block.attn1.register_forward_hook(after)
        unet(*inputs)
        later.remove()
    for handle in handles:
        handle.remove()
    return block.attn1, seen["x"], seen["y"], patch, seen["block"]


def attention_by_loop(attn, q_tokens, kv_tokens):
    """softmax(q k^T * scale) v per head, then the output projection, one row at a time."""
    q, k, v = attn.to_q(q_tokens), attn.to_k(kv_tokens), attn.to_v(kv_tokens)
    heads, dim = attn.heads, q.shape[-1] // attn.heads
    out = torch.zeros_like(q)
    for h in range(heads):
        cols = slice(h * dim, (h + 1) * dim)
        for i in range(q.shape[0]):
            logits = torch.stack([q[i, cols] @ k[j, cols] for j in range(k.shape[0])]) * dim**-0.5
            out[i, cols] = logits.softmax(0) @ v[:, cols]
    return attn.to_out[1](attn.to_out[0](out))


def nearest_exact(tokens, height, width, factor):
    """The nearest-exact grid of ``torch.nn.functional.interpolate``: output i reads input
    floor((i + 0.5) * in / out)."""
    out_h, out_w = math.ceil(height / factor), math.ceil(width / factor)
    picks = []
    for i in range(out_h):
        for j in range(out_w):
            row = min(int((i + 0.5) * height / out_h), height - 1)
            col = min(int((j + 0.5) * width / out_w), width - 1)
            picks.append(tokens[row * width + col])
    return torch.stack(picks)


@pytest.mark.parametrize(("factor", "grid"), [(2, (16, 12)), (3, (16, 12)), (2, (14, 10))])
def test_todo_attends_to_the_downsampled_grid(factor, grid):
    unet = make_unet()
    attn, x, y, patch, _ = capture_attn1(
        unet,
        unet_inputs(height=grid[0], width=grid[1]),
        method="todo",
        ratio_attn1=0.5,
        todo_factor=factor,
    )
    stats = patch.last_stats["UNet2DConditionModel"]
    assert stats.merged["attn1"] == 3 and stats.tokens[0][2]["attn1"] > 0
    with torch.no_grad():
        for b in range(x.shape[0]):
            kv = nearest_exact(x[b], grid[0], grid[1], factor)
            torch.testing.assert_close(
                y[b], attention_by_loop(attn, x[b], kv), rtol=1e-9, atol=1e-10
            )


def facility_location_by_loop(x, count):
    unit = x / x.norm(dim=-1, keepdim=True)
    n = x.shape[0]
    sim = [[(float(unit[i] @ unit[j]) + 1) / 2 for j in range(n)] for i in range(n)]
    chosen: list[int] = []
    for _ in range(count):

        def value(s):
            return sum(max(sim[i][j] for j in s) if s else 0.0 for i in range(n))

        base = value(chosen)
        gains = [(value([*chosen, j]) - base, -j) for j in range(n) if j not in chosen]
        chosen.append(-max(gains)[1])
    return sorted(chosen)


def test_facility_location_equals_the_greedy_loop():
    x = torch.randn(3, 20, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = facility_location(x, 7)
    for b in range(3):
        assert got[b].tolist() == facility_location_by_loop(x[b], 7)


@pytest.mark.parametrize(("height", "width", "tile", "count"), [(4, 5, 8, 7), (6, 7, 3, 17)])
def test_tiled_selection_is_the_greedy_loop_in_every_tile(height, width, tile, count):
    """ToMA's local selection: each tile's picks are the greedy choice over its own tokens
    (the batched greedy, checked against the loop above; near-ties may order the loop's
    later picks differently, so against the loop the coverage reached must match), with a
    share of ``count`` in proportion to its size (one tile: the global greedy)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, height * width, 6, generator=g, dtype=torch.float64)
    got = tiled_facility_location(x, height, width, tile, count)
    assert got.shape == (2, count)
    cells = {}
    for i in range(height * width):
        cells.setdefault((i // width // tile, i % width // tile), []).append(i)
    sizes = [len(v) for v in cells.values()]
    shares = [count * n / (height * width) for n in sizes]
    quota = [int(q) for q in shares]
    for k in sorted(range(len(shares)), key=lambda k: -(shares[k] - quota[k]))[
        : count - sum(quota)
    ]:
        quota[k] += 1
    for b in range(2):
        expected = []
        for members, q in zip(cells.values(), quota, strict=True):
            local = facility_location(x[b : b + 1, members], q)[0].tolist()
            expected += [members[j] for j in local]
            picks = [j for j, i in enumerate(members) if i in got[b].tolist()]
            loop = facility_location_by_loop(x[b, members], q)
            assert coverage(x[b, members], picks) == pytest.approx(
                coverage(x[b, members], loop), rel=1e-9
            )
        assert got[b].tolist() == sorted(expected)
    if tile >= max(height, width):
        assert got.tolist() == facility_location(x, count).tolist()


def toma_by_loop(x, dst, tau):
    """ToMA's merge and un-merge matrices written out: A[i, d] = softmax_d(cos(x_i, x_d)/tau)."""
    unit = x / x.norm(dim=-1, keepdim=True)
    weights = torch.zeros(x.shape[0], len(dst), dtype=x.dtype)
    for i in range(x.shape[0]):
        logits = torch.stack([unit[i] @ unit[d] / tau for d in dst])
        weights[i] = logits.softmax(0)
    merged = torch.stack(
        [
            sum(weights[i, k] * x[i] for i in range(x.shape[0])) / weights[:, k].sum()
            for k in range(len(dst))
        ]
    )
    return weights, merged


def coverage(x, chosen):
    """The facility-location value sum_i max_{j in chosen} (cos(x_i, x_j) + 1) / 2."""
    unit = x / x.norm(dim=-1, keepdim=True)
    return sum(max((float(unit[i] @ unit[j]) + 1) / 2 for j in chosen) for i in range(len(x)))


def test_toma_merges_and_restores_as_the_loop_does():
    unet = make_unet()
    attn, x, y, patch, block_input = capture_attn1(
        unet, unet_inputs(batch=1), method="toma", ratio_attn1=0.5, toma_tau=0.2, toma_tile=0
    )  # toma_tile=0: the global greedy (the tiled selection has its own test above)
    assert patch.last_stats["UNet2DConditionModel"].merged["attn1"] == 3
    # one plan per block, from the block's input (as Turbo's), applied to attn1's normed input
    tokens, planned_on = x[0], block_input[0]
    keep = tokens.shape[0] - tokens.shape[0] // 2
    dst = soft_plan(block_input, keep, 0.2).dst_idx[0].tolist()
    # the greedy choice itself equals the loop's on random tokens (test above); here
    # near-ties may order later picks differently: the objective reached must match
    loop_dst = facility_location_by_loop(planned_on, keep)
    assert coverage(planned_on, dst) == pytest.approx(coverage(planned_on, loop_dst), rel=1e-6)
    weights = toma_by_loop(planned_on, dst, 0.2)[0]
    merged = torch.stack(
        [
            sum(weights[i, k] * tokens[i] for i in range(len(tokens))) / weights[:, k].sum()
            for k in range(len(dst))
        ]
    )
    with torch.no_grad():
        out = attention_by_loop(attn, merged, merged)
    expected = torch.stack(
        [sum(weights[i, k] * out[k] for k in range(len(dst))) for i in range(len(tokens))]
    )
    torch.testing.assert_close(y[0], expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["todo", "toma"])
def test_peers_on_pixart_and_ratio_zero(method):
    model = tiny_pixart()
    x = pixart_inputs(2)
    with torch.no_grad():
        reference = model(**x).sample
        with ta.patched(model, ratio=0.5, method=method) as patch:
            out = model(**x).sample
        with ta.patched(model, ratio=0, method=method):
            assert torch.equal(model(**x).sample, reference)
    assert patch.last_stats["PixArtTransformer2DModel"].merged["attn1"] == 2
    assert not torch.equal(out, reference) and (out - reference).norm() < 0.2 * reference.norm()


def test_toma_tiles_reach_the_plan():
    """toma_tile picks the destinations per tile of the model's grid (PixArt: 8 x 8 tokens):
    tiles of 2 x 2 give another plan than one tile (the global greedy), both close."""
    model = tiny_pixart()
    x = pixart_inputs(1)
    outs = {}
    with torch.no_grad():
        reference = model(**x).sample
        for tile in (0, 2, 8):
            with ta.patched(model, ratio=0.5, method="toma", toma_tile=tile):
                outs[tile] = model(**x).sample
    assert torch.equal(outs[0], outs[8])  # one 8 x 8 tile is the whole grid
    assert not torch.equal(outs[0], outs[2])
    assert (outs[2] - reference).norm() < 0.2 * reference.norm()


def test_toma_and_todo_on_sd3_and_flux():
    """Both peers run on joint attention (ToDo's oracle: tests/adapters/test_dit_todo_joint.py);
    ToDo's window average is refused on FLUX's rotary attention, naming the parameter."""
    model = tiny_sd3()
    with ta.patched(model, ratio=0.5, method="toma") as patch, torch.no_grad():
        model(**sd3_inputs(2))
    assert patch.last_stats["SD3Transformer2DModel"].merged == {"attn1": 2, "attn2": 0, "ff": 2}
    for build, x, calls in ((tiny_sd3, sd3_inputs(2), 2), (tiny_flux, flux_inputs(2), 3)):
        model = build()
        with torch.no_grad():
            reference = model(**x).sample
            with ta.patched(model, method="todo") as patch:
                out = model(**x).sample
        (stats,) = patch.last_stats.values()
        assert stats.merged == {"attn1": calls, "attn2": 0, "ff": 0} and not stats.passed
        assert not torch.equal(out, reference)
        assert (out - reference).norm() < 0.2 * reference.norm()
    with pytest.raises(ValueError, match="todo_mode='avg'"):
        ta.apply(tiny_flux(), method="todo", todo_mode="avg")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "tome"}, "method must be 'turbo', 'todo' or 'toma'"),
        ({"todo_factor": 1}, "todo_factor must be an int >= 2"),
        ({"todo_mode": "bilinear"}, "todo_mode must be"),
        ({"toma_tau": 0}, "toma_tau must be a number > 0"),
        ({"toma_tile": -1}, "toma_tile must be an int >= 0"),
    ],
)
def test_bad_peer_settings_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ta.apply(make_unet(), **kwargs)


@pytest.mark.parametrize("method", ["todo", "toma"])
def test_sd_suite_selects_the_peer(method):
    """turbo-eval's SD suite runs ToDo and ToMA as peer methods at its r (percent merged)."""
    from turbo_eval.methods import method_overrides
    from turbo_eval.models import load_model

    overrides = method_overrides(method, 50, None)
    assert overrides == {"r": 50, "peer": method}
    model = load_model("sd-tiny", None, {})
    model.set_method(overrides)
    try:
        assert model.handle.settings.method == method
        assert model.handle.settings.ratio_attn1 == 0.5
    finally:
        model.set_method(None)
    assert model.unpatched
