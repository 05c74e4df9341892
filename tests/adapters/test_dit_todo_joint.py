"""ToDo on joint attention (SD3 / SD3.5, FLUX double and single blocks), tiny real configs.

The oracle is written here, slow and explicit, in float64: per batch row and per head,
``softmax(q k^T / sqrt(d)) v`` over the keys and values of ``[text; image tokens picked
by index on the grid]`` in the model's own order, the picks computed from the
nearest-exact formula (output cell ``i`` reads input ``floor((i + 0.5) * in / out)``),
the window means written as loops, FLUX's rotation written pair by pair. It is compared
with what the patched attention module returns inside the patched model. FLUX's own
rotary embedding runs in float32 (diffusers' ``apply_rotary_emb`` casts), so its
comparisons hold to float32 precision; the others to float64's.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch

import turbo_adapters as ta
from turbo_adapters import TurboBypassWarning

diffusers = pytest.importorskip("diffusers")

from support.tiny_dit import TEXT_LEN, flux_inputs, sd3_inputs, tiny_flux, tiny_sd3  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TIGHT = dict(rtol=1e-9, atol=1e-11)  # float64 all the way
ROTARY = dict(rtol=2e-5, atol=2e-6)  # FLUX: the model rotates in float32


def as_double(inputs):
    return {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in inputs.items()
    }


def build(name, **kwargs):
    if name == "flux":
        return tiny_flux(**kwargs).double()
    return tiny_sd3(dual=name == "sd3.5", **kwargs).double()


def inputs_for(name, batch, grid):
    """Inputs whose image grid is ``grid`` (SD3: latent of twice the grid, patch 2)."""
    if name == "flux":
        return as_double(flux_inputs(batch, *grid))
    return as_double(sd3_inputs(batch, 2 * grid[0], 2 * grid[1]))


def run(model, x):
    with torch.no_grad():
        return model(**x).sample


def attentions(model):
    """``(name, module)`` of every joint or image attention of the tiny model."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m).__name__ in ("Attention", "FluxAttention")
    ]


def capture(model, x, **settings):
    """Each attention's call (its kwargs as it receives them) and its output, in a patched
    call; the capture sees the input before Turbo's hooks and the output after them."""
    seen = {}

    def before(m, args, kwargs, name):
        seen[name] = {"kwargs": dict(kwargs)}

    def after(m, args, kwargs, output, name):
        seen[name]["out"] = output

    handles = [
        module.register_forward_pre_hook(
            functools.partial(before, name=name), with_kwargs=True, prepend=True
        )
        for name, module in attentions(model)
    ]
    with ta.patched(model, method="todo", **settings) as patch:
        for name, module in attentions(model):
            hook = functools.partial(after, name=name)
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        out = run(model, x)
    for handle in handles:
        handle.remove()
    return seen, patch, out


# ----------------------------------------------------------------------- the oracle
def nearest_picks(height, width, factor):
    """Raster indices of the tokens the nearest-exact grid reads, by the formula."""
    out_h, out_w = math.ceil(height / factor), math.ceil(width / factor)
    picks = []
    for i in range(out_h):
        row = min(int((i + 0.5) * height / out_h), height - 1)
        for j in range(out_w):
            col = min(int((j + 0.5) * width / out_w), width - 1)
            picks.append(row * width + col)
    return picks


def window_means(tokens, height, width, factor):
    """``(N', C)``: the mean of each ``factor x factor`` window (partial at the edges)."""
    means = []
    for i in range(0, height, factor):
        for j in range(0, width, factor):
            cells = [
                tokens[r * width + c]
                for r in range(i, min(i + factor, height))
                for c in range(j, min(j + factor, width))
            ]
            means.append(sum(cells) / len(cells))
    return torch.stack(means)


def heads(x, dim):
    return x.reshape(x.shape[0], -1, dim)  # (S, H, D)


def rotate(x, cos, sin):
    """(S, H, D) rows turned pair by pair: (a, b) -> (a cos - b sin, b cos + a sin)."""
    cos, sin = cos.double()[:, None, :], sin.double()[:, None, :]
    out = torch.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos[..., 0::2] - x[..., 1::2] * sin[..., 0::2]
    out[..., 1::2] = x[..., 1::2] * cos[..., 1::2] + x[..., 0::2] * sin[..., 1::2]
    return out


def eager_attention(q, k, v):
    """(S, H, D) queries, (S', H, D) keys/values -> (S, H * D), one head at a time."""
    out = []
    for h in range(q.shape[1]):
        logits = q[:, h] @ k[:, h].T / math.sqrt(q.shape[-1])
        out.append(logits.softmax(dim=-1) @ v[:, h])
    return torch.cat(out, dim=-1)


def norm(attn, name, x):
    module = getattr(attn, name, None)
    return module(x) if module is not None else x


def oracle(attn, call, grid, factor, mode="nearest-exact", key_rows=None, picks=None):
    """The attention's output for batch row 0..B-1 from its call kwargs, written out.

    ``key_rows`` (FLUX): rotary rows of the image keys (default: the picked tokens'
    own rows); ``picks``: the image tokens read (default: the nearest-exact formula).
    """
    kw = call["kwargs"]
    hidden, text = kw["hidden_states"], kw.get("encoder_hidden_states")
    rotary = kw.get("image_rotary_emb")
    flux = type(attn).__name__ == "FluxAttention"
    prefix = TEXT_LEN if flux and text is None else 0  # FLUX single: [text; image]
    picks = nearest_picks(*grid, factor) if picks is None else picks
    dim = attn.head_dim if flux else attn.to_q.out_features // attn.heads
    rows = []
    for b in range(hidden.shape[0]):
        seq = hidden[b]
        image = seq[prefix:]
        if mode == "avg":
            small = window_means(image, *grid, factor)
        else:
            small = torch.stack([image[p] for p in picks])
        kv_in = torch.cat([seq[:prefix], small])
        q = norm(attn, "norm_q", heads(attn.to_q(seq), dim))
        k = norm(attn, "norm_k", heads(attn.to_k(kv_in), dim))
        v = heads(attn.to_v(kv_in), dim)
        num_text = prefix
        if text is not None:
            t = text[b]
            num_text = t.shape[0]
            tq = norm(attn, "norm_added_q", heads(attn.add_q_proj(t), dim))
            tk = norm(attn, "norm_added_k", heads(attn.add_k_proj(t), dim))
            tv = heads(attn.add_v_proj(t), dim)
            if flux:
                q, k, v = torch.cat([tq, q]), torch.cat([tk, k]), torch.cat([tv, v])
            else:
                q, k, v = torch.cat([q, tq]), torch.cat([k, tk]), torch.cat([v, tv])
        if rotary is not None:
            cos, sin = rotary
            own = [num_text + p for p in (picks if key_rows is None else key_rows)]
            krows = list(range(num_text)) + own
            q = rotate(q, cos, sin)
            k = rotate(k, cos[krows], sin[krows])
        o = eager_attention(q, k, v)
        if text is None:
            rows.append(o if flux else attn.to_out[0](o))
            continue
        if flux:
            t_out, i_out = o[:num_text], o[num_text:]
        else:
            i_out, t_out = o[: image.shape[0]], o[image.shape[0] :]
        if flux or not attn.context_pre_only:
            t_out = attn.to_add_out(t_out)
        rows.append((attn.to_out[0](i_out), t_out))
    if isinstance(rows[0], tuple):
        return tuple(torch.stack([r[i] for r in rows]) for i in range(2))
    return torch.stack(rows)


def assert_matches(got, expected, tolerance):
    if isinstance(expected, tuple):
        assert isinstance(got, tuple) and len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, **tolerance)
    else:
        torch.testing.assert_close(got, expected, **tolerance)


def distance(got, expected):
    if isinstance(expected, tuple):
        return max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True))
    return float((got - expected).abs().max())


# ------------------------------------------------------------------ against the oracle
CASES = [
    ("sd3", (8, 8), 2, "nearest-exact"),
    ("sd3", (8, 8), 3, "nearest-exact"),
    ("sd3", (10, 6), 3, "nearest-exact"),  # sides the factor does not divide
    ("sd3", (8, 8), 2, "avg"),
    ("sd3", (10, 6), 4, "avg"),
    ("sd3.5", (8, 8), 2, "nearest-exact"),  # the joint attn and the image-only attn2
    ("sd3.5", (6, 10), 3, "avg"),
    ("flux", (8, 8), 2, "nearest-exact"),
    ("flux", (8, 8), 3, "nearest-exact"),
    ("flux", (7, 5), 2, "nearest-exact"),
]


@pytest.mark.parametrize(("name", "grid", "factor", "mode"), CASES)
def test_every_joint_attention_equals_the_explicit_oracle(name, grid, factor, mode):
    model = build(name)
    x = inputs_for(name, 2, grid)
    seen, patch, _ = capture(model, x, todo_factor=factor, todo_mode=mode)
    (stats,) = patch.last_stats.values()
    called = attentions(model)
    assert stats.merged["attn1"] == len(called) and not stats.passed
    kept = math.ceil(grid[0] / factor) * math.ceil(grid[1] / factor)
    assert {r["attn1"] for _, _, r in stats.tokens} == {grid[0] * grid[1] - kept}
    tolerance = ROTARY if name == "flux" else TIGHT
    with torch.no_grad():
        for attn_name, attn in called:
            expected = oracle(attn, seen[attn_name], grid, factor, mode)
            assert_matches(seen[attn_name]["out"], expected, tolerance)


def test_the_oracle_can_fail_wrong_rotary_rows_or_wrong_picks_do_not_match():
    """Mutations of the oracle: FLUX keys with the rotary rows of the first image tokens
    instead of the picked ones', and SD3 picks moved by one token, must not match."""
    model = build("flux")
    seen, _, _ = capture(model, inputs_for("flux", 1, (8, 8)), todo_factor=2)
    picks = nearest_picks(8, 8, 2)
    with torch.no_grad():
        for attn_name, attn in attentions(model):
            call = seen[attn_name]
            assert_matches(call["out"], oracle(attn, call, (8, 8), 2), ROTARY)
            wrong = oracle(attn, call, (8, 8), 2, key_rows=list(range(len(picks))))
            assert distance(call["out"], wrong) > 1e3 * ROTARY["atol"]
    model = build("sd3")
    seen, _, _ = capture(model, inputs_for("sd3", 1, (8, 8)), todo_factor=2)
    moved = [p - 1 for p in picks]
    with torch.no_grad():
        for attn_name, attn in attentions(model):
            call = seen[attn_name]
            wrong = oracle(attn, call, (8, 8), 2, picks=moved)
            assert distance(call["out"], wrong) > 1e-4


# ------------------------------------------------------- nothing downsampled, remove()
@pytest.mark.parametrize("name", ["sd3", "sd3.5", "flux"])
def test_factor_one_is_refused_ratio_zero_is_exact_and_remove_restores(name):
    model = build(name)
    x = inputs_for(name, 2, (8, 8))
    processors = {n: m.processor for n, m in attentions(model)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = run(model, x)
    with pytest.raises(ValueError, match="todo_factor must be an int >= 2"):
        ta.apply(model, method="todo", todo_factor=1)
    with ta.patched(model, method="todo", ratio=0):  # nothing planned: the model itself
        assert torch.equal(run(model, x), reference)
    patch = ta.apply(model, method="todo", todo_factor=2)
    out = run(model, x)
    assert not torch.equal(out, reference)
    assert (out - reference).norm() < 0.2 * reference.norm()
    wrapped = {n: m.processor for n, m in attentions(model)}
    assert all(type(p).__name__ == "ToDoJointProcessor" for p in wrapped.values())
    assert all(wrapped[n].original is processors[n] for n in processors)
    patch.configure(ratio_attn1=0.0)  # the wrapper without a plan runs the original
    with pytest.warns(TurboBypassWarning, match="nothing was merged"):  # ToDo reads attn1's
        assert torch.equal(run(model, x), reference)
    patch.remove()
    assert all(m.processor is processors[n] for n, m in attentions(model))
    assert torch.equal(run(model, x), reference)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_configure_to_todo_wraps_at_the_next_call_and_remove_unwraps():
    model = build("flux")
    x = inputs_for("flux", 1, (8, 8))
    processors = {n: m.processor for n, m in attentions(model)}
    reference = run(model, x)
    with ta.patched(model, ratio=0.5) as patch:
        run(model, x)
        assert all(m.processor is processors[n] for n, m in attentions(model))
        patch.configure(method="todo", ratio_attn1=0.5, todo_factor=2)
        todo = run(model, x)
        assert patch.last_stats["FluxTransformer2DModel"].merged["attn1"] == 3
    with ta.patched(model, method="todo", todo_factor=2):
        assert torch.equal(run(model, x), todo)
    assert all(m.processor is processors[n] for n, m in attentions(model))
    assert torch.equal(run(model, x), reference)


# ------------------------------------------------------------------------ batching
@pytest.mark.parametrize("name", ["sd3", "sd3.5", "flux"])
def test_batch_rows_equal_single_rows(name):
    model = build(name)
    x = inputs_for(name, 3, (8, 6))
    with ta.patched(model, method="todo", todo_factor=3):
        batched = run(model, x)
        for b in range(3):
            row = {
                k: v[b : b + 1]
                if isinstance(v, torch.Tensor) and k not in ("img_ids", "txt_ids")
                else v
                for k, v in x.items()
            }
            torch.testing.assert_close(run(model, row), batched[b : b + 1], **TIGHT)


# ------------------------------------------------------------- what is refused, said
def test_avg_is_refused_on_rotary_flux_at_apply_and_configure():
    model = build("flux")
    with pytest.raises(ValueError, match=r"todo_mode='avg'.*rotary"):
        ta.apply(model, method="todo", todo_mode="avg")
    assert not any(m._forward_pre_hooks for m in model.modules())
    with ta.patched(model, method="todo") as patch:
        with pytest.raises(ValueError, match="todo_mode='avg'"):
            patch.configure(todo_mode="avg")
        assert patch.settings.todo_mode == "nearest-exact"
        with ta.patched(tiny_sd3(), method="todo") as sd3:  # no rotary: both modes
            sd3.configure(todo_mode="avg")
    with pytest.raises(ValueError, match="attn1_kv=True"):
        ta.apply(model, attn1_kv=True)


def test_an_unknown_processor_passes_through_and_says_so():
    """A processor ToDo does not know (here a subclass of SD3's) is left to run: the
    call is the unpatched model's, the reason is in the stats and a warning."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class OwnJointProcessor(JointAttnProcessor2_0):
        pass

    model = build("sd3")
    model.set_attn_processor(OwnJointProcessor())
    x = inputs_for("sd3", 1, (8, 8))
    reference = run(model, x)
    with ta.patched(model, method="todo") as patch:
        with pytest.warns(TurboBypassWarning, match="OwnJointProcessor"):
            out = run(model, x)
        assert all(type(m.processor) is OwnJointProcessor for _, m in attentions(model))
    assert torch.equal(out, reference)
    (stats,) = patch.last_stats.values()
    assert stats.merged["attn1"] == 0
    assert all("OwnJointProcessor" in why for _, _, why in stats.passed)


def test_todo_runs_quietly_on_every_block():
    model = build("sd3.5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ta.patched(model, method="todo", todo_factor=2) as patch:
            run(model, inputs_for("sd3.5", 2, (8, 8)))
    assert patch.last_stats["SD3Transformer2DModel"].merged == {"attn1": 3, "attn2": 0, "ff": 0}


def test_an_attention_backend_set_while_wrapped_reaches_the_model_and_todo_says_so():
    model = build("flux")
    x = inputs_for("flux", 1, (8, 8))
    processors = {n: m.processor for n, m in attentions(model)}
    with ta.patched(model, method="todo") as patch:
        run(model, x)  # wrapped now
        model.set_attention_backend("native")
        assert all(p._attention_backend is not None for p in processors.values())
        with pytest.warns(TurboBypassWarning, match="attention backend"):
            run(model, x)
    (stats,) = patch.last_stats.values()
    assert stats.merged["attn1"] == 0
    assert all(m.processor is processors[n] for n, m in attentions(model))
    assert all(p._attention_backend.value == "native" for p in processors.values())
    model.reset_attention_backend()
