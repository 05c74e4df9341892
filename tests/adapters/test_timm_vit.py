"""The timm ViT adapter on tiny random-init timm models of every supported variant.

Oracles: the unpatched timm model (r = 0, remove), an eager re-implementation of the
blocks with an explicit softmax (r > 0), slow pooling loops over the source map, and
per-sample runs for batching.
"""

from __future__ import annotations

import copy
import gc
import inspect
import pickle
import threading
import warnings
import weakref

import pytest
import torch
from torch import nn

import turbo_adapters as ta
from turbo_core import RClippedWarning, ReductionState, TokenReducer, TurboConfig

timm_vt = pytest.importorskip("timm.models.vision_transformer")
timm_deit = pytest.importorskip("timm.models.deit")

DEPTH = 4
PATCHES = 16  # 32 px images, 8 px patches

VARIANTS = {
    "cls": {},
    "avg": {"class_token": False, "global_pool": "avg"},
    "distilled": {"distilled": True},
    "registers": {"reg_tokens": 4},
    "layerscale": {"init_values": 1e-5},
    "qk_norm": {"qk_norm": True},
}


def make_vit(variant: str = "cls", seed: int = 0, **extra) -> nn.Module:
    kwargs = dict(VARIANTS[variant], **extra)
    distilled = kwargs.pop("distilled", False)
    cls = timm_deit.VisionTransformerDistilled if distilled else timm_vt.VisionTransformer
    torch.manual_seed(seed)
    model = cls(
        img_size=32, patch_size=8, embed_dim=48, depth=DEPTH, num_heads=4, num_classes=10, **kwargs
    )
    _informative_init(model)
    return model.eval()


@torch.no_grad()
def _informative_init(model: nn.Module) -> None:
    """Weights large enough that attention is peaked and tokens differ (timm's init gives
    near-uniform attention, which would hide errors in q, k or the size bias)."""
    for name, p in model.named_parameters():
        if name.endswith("gamma"):  # LayerScale keeps its init_values
            continue
        if p.dim() >= 2 and "token" not in name and "pos_embed" not in name:
            gain = 3.0 if "qkv" in name else 1.0
            fan_in = p[0].numel()
            nn.init.normal_(p, std=gain / fan_in**0.5)
        elif "norm" in name and name.endswith("weight"):
            nn.init.normal_(p, mean=1.0, std=0.2)
        else:  # biases, tokens, position embeddings
            nn.init.normal_(p, std=0.5)


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 3, 32, 32)


def expected_counts(num_tokens: int, protected: int, schedule) -> list[int]:
    counts = []
    for r in schedule:
        num_tokens -= max(min(r, (num_tokens - protected) // 2), 0)
        counts.append(num_tokens)
    return counts


def slot_counts(source: torch.Tensor, num_slots: int) -> torch.Tensor:
    return torch.stack([torch.bincount(row, minlength=num_slots) for row in source])


def eager_turbo_features(model: nn.Module, x: torch.Tensor, config: TurboConfig):
    """The blocks re-written with an explicit softmax, proportional attention and the
    CLS row taken from the full attention matrix; merging through the core reducer."""
    reducer = TokenReducer(config)
    state = reducer.start(len(model.blocks))
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for blk in model.blocks:
        attn = blk.attn
        y = blk.norm1(h)
        batch, tokens, channels = y.shape
        qkv = attn.qkv(y).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = (q @ k.transpose(-1, -2)) * attn.scale
        if state.size is not None:
            logits = logits + state.size[:, None, None, :, 0].log()
        weights = logits.softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, tokens, channels)
        h = h + blk.ls1(attn.proj(attn.norm(out)))
        semantic = weights[:, :, 0].mean(dim=1)  # CLS row, averaged over heads
        h = reducer.step(h, k.mean(dim=1), state, semantic)
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return model.norm(h), state


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [True, False])
def test_r0_equals_unpatched(variant: str, fused: bool) -> None:
    model = make_vit(variant)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    x = images()
    with torch.no_grad():
        ref_features, ref_logits = model.forward_features(x), model(x)
        handle = ta.apply(model, r=0)
        features, logits = model.forward_features(x), model(x)
    tokens = PATCHES + model.num_prefix_tokens
    assert handle.last_state.token_counts == [tokens] * DEPTH
    # fused SDPA against timm's fused (same kernel) or eager (float32 rounding) attention
    tol = 1e-5 if fused else 2e-4
    torch.testing.assert_close(features, ref_features, atol=tol, rtol=tol)
    torch.testing.assert_close(logits, ref_logits, atol=tol, rtol=tol)


@pytest.mark.parametrize("variant", ["cls", "registers", "qk_norm"])
def test_merging_matches_eager_oracle(variant: str) -> None:
    model = make_vit(variant)
    x = images(3)
    handle = ta.apply(model, r=3, alpha=2.0, trace_source=True)
    with torch.no_grad():
        features = model.forward_features(x)
        got = handle.last_state
        ref, oracle_state = eager_turbo_features(model, x, handle.config)
    assert got.token_counts == oracle_state.token_counts
    assert torch.equal(got.source, oracle_state.source)
    torch.testing.assert_close(features, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------- schedule, sources
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("r", [2, [3, 0, 5, 1], (4, -1.0)])
def test_token_counts_follow_schedule(variant: str, r) -> None:
    model = make_vit(variant)
    handle = ta.apply(model, r=r, trace_source=True)
    with torch.no_grad():
        features = model.forward_features(images())
    state = handle.last_state
    prefix = model.num_prefix_tokens
    schedule = TurboConfig(r=r).schedule(DEPTH)
    counts = expected_counts(PATCHES + prefix, prefix, schedule)
    assert state.token_counts == counts
    assert features.shape[1] == counts[-1]
    assert state.source.shape == (2, PATCHES + prefix)
    assert torch.equal(slot_counts(state.source, counts[-1]).float(), state.size[..., 0])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_alpha_zero_equals_redundancy_mode(variant: str) -> None:
    model = make_vit(variant)
    x = images(3)
    sources, outputs = [], []
    for overrides in ({"alpha": 0.0}, {"mode": "redundancy", "alpha": 3.0}):
        with ta.patched(model, r=4, trace_source=True, **overrides) as handle, torch.no_grad():
            outputs.append(model(x))
            sources.append(handle.last_state.source)
    assert torch.equal(sources[0], sources[1])
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("variant", ["cls", "distilled", "registers"])
def test_protected_tokens_never_merge(variant: str) -> None:
    model = make_vit(variant)
    handle = ta.apply(model, r=8, trace_source=True)
    with torch.no_grad():
        model(images(4))
    prefix = model.num_prefix_tokens
    assert handle.config.protected == prefix
    source = handle.last_state.source
    counts = slot_counts(source, handle.last_state.token_counts[-1])
    # each prefix token keeps its own slot, at the front, and nothing joins it
    assert torch.equal(source[:, :prefix], torch.arange(prefix).expand(4, prefix))
    assert torch.all(counts[:, :prefix] == 1)
    assert handle.last_state.token_counts[-1] < PATCHES  # merging did happen


def test_avg_pool_is_size_weighted() -> None:
    model = make_vit("avg")
    model.reset_classifier(0)  # the model returns the pooled (fc-normed) features
    x = images(3)
    handle = ta.apply(model, r=3, trace_source=True)
    with torch.no_grad():
        pooled = model(x)
        features = model.forward_features(x)
        split = model.forward_head(features, pre_logits=True)  # pooled outside forward()
    state = handle.last_state
    assert features.shape[1] < PATCHES
    # slow recomputation 1: every original patch once, through the source map
    by_source = torch.stack(
        [
            torch.stack([features[b, slot] for slot in state.source[b].tolist()]).mean(0)
            for b in range(3)
        ]
    )
    # slow recomputation 2: sum(size * x) / sum(size) with explicit loops
    by_size = torch.stack(
        [
            sum(state.size[b, n, 0] * features[b, n] for n in range(features.shape[1]))
            / state.size[b].sum()
            for b in range(3)
        ]
    )
    torch.testing.assert_close(by_source, by_size, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, model.fc_norm(by_size), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split, pooled, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(pooled, model.fc_norm(features.mean(1)), atol=1e-4)


# ----------------------------------------------------------------- patch / remove
@pytest.mark.parametrize("variant", ["cls", "distilled"])
def test_remove_restores_model_exactly(variant: str) -> None:
    model = make_vit(variant)
    x = images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    with torch.no_grad():
        ref = model(x)
        handle = ta.apply(model, r=3)
        merged = model(x)
        assert handle.last_state.token_counts[-1] < PATCHES
        assert set(model.state_dict()) == set(before)
        ta.remove(model)
        after = model(x)
    assert not torch.equal(merged, ref)
    assert torch.equal(after, ref)
    assert [type(m) for m in model.modules()] == classes
    state = model.state_dict()
    assert list(state) == list(before)
    assert all(torch.equal(state[k], before[k]) for k in before)
    assert ta.handle_of(model) is None


def _unpatched_everywhere(model: nn.Module) -> bool:
    return all(ta.handle_of(m) is None and "forward" not in m.__dict__ for m in model.modules())


def test_deepcopy_of_a_patched_model_is_an_unpatched_model_and_says_so() -> None:
    model, x = make_vit(), images()
    with torch.no_grad():
        ref = model(x)
        handle = ta.apply(model, r=3)
        merged = model(x)
    with pytest.warns(ta.UnpatchedCopyWarning, match="not patched.*apply Turbo to it"):
        twin = copy.deepcopy(model)
    assert _unpatched_everywhere(twin)
    with torch.no_grad():
        assert torch.equal(twin(x), ref)  # the copy runs unpatched, on its own weights
        assert torch.equal(model(x), merged)  # the original is still patched
        twin_handle = ta.apply(twin, r=3)  # and the copy patches independently
        assert torch.equal(twin(x), merged)
        assert twin_handle.last_state.token_counts == handle.last_state.token_counts
        ta.remove(model)
        assert torch.equal(model(x), ref) and torch.equal(twin(x), merged)


@pytest.mark.parametrize("save", ["pickle", "torch.save"])
def test_saving_a_patched_model_saves_the_unpatched_model(save: str, tmp_path) -> None:
    model, x = make_vit(), images()
    with torch.no_grad():
        ref = model(x)
    ta.apply(model, r=3)

    def round_trip(module: nn.Module) -> nn.Module:
        if save == "pickle":
            return pickle.loads(pickle.dumps(module))
        torch.save(module, tmp_path / "model.pt")
        return torch.load(tmp_path / "model.pt", weights_only=False)

    with pytest.warns(ta.UnpatchedCopyWarning, match="not patched"):
        loaded = round_trip(model)
    assert _unpatched_everywhere(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    assert ta.handle_of(model) is not None  # saving changed nothing on the model


def test_a_patch_itself_refuses_copy_and_pickle_saying_to_remove_it() -> None:
    handle = ta.apply(make_vit(), r=3)
    for attempt in (copy.deepcopy, copy.copy, pickle.dumps):
        for target in (handle, handle.site):
            with pytest.raises(TypeError, match=r"turbo_adapters.remove\(model\) first"):
                attempt(target)


def test_patching_twice_raises() -> None:
    model = make_vit()
    ta.apply(model, r=2)
    with pytest.raises(RuntimeError, match="already patched"):
        ta.apply(model, r=2)


def test_patched_context_manager() -> None:
    model = make_vit()
    x = images()
    with torch.no_grad():
        ref = model(x)
        with ta.patched(model, r=3) as handle:
            merged = model(x)
            assert ta.handle_of(model) is handle
            assert handle.last_state.token_counts[-1] < PATCHES
        after = model(x)
    assert not torch.equal(merged, ref)
    assert torch.equal(after, ref)
    assert type(model) is timm_vt.VisionTransformer


def test_changing_r_on_the_handle_takes_effect() -> None:
    model = make_vit()
    handle = ta.apply(model, r=0)
    with torch.no_grad():
        model(images())
        assert handle.last_state.token_counts == [PATCHES + 1] * DEPTH
        handle.r = 2
        model(images())
        assert handle.last_state.token_counts == expected_counts(PATCHES + 1, 1, [2] * DEPTH)
        handle.r = [0, 4]
        model(images())
        assert handle.last_state.token_counts == expected_counts(PATCHES + 1, 1, [0, 4, 0, 0])
    assert ta.handle_of(model) is handle


def test_r_as_numpy_or_tensor_integer_is_accepted() -> None:
    np = pytest.importorskip("numpy")
    model = make_vit()
    handle = ta.apply(model, r=np.int64(2))
    with torch.no_grad():
        model(images())
        assert handle.last_state.token_counts == expected_counts(PATCHES + 1, 1, [2] * DEPTH)
        handle.r = torch.tensor(3)
        model(images())
    assert handle.last_state.token_counts == expected_counts(PATCHES + 1, 1, [3] * DEPTH)


def _clip_warnings(run) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")  # the patch's own once, not the filter's
        run()
    return [w for w in caught if issubclass(w.category, RClippedWarning)]


def test_clip_warning_is_said_once_per_setting_at_the_callers_line() -> None:
    model, x = make_vit(), images()
    handle = ta.apply(model, r=7)  # 17 tokens, 10 after the first block: 4 at most
    line = inspect.currentframe().f_lineno + 1
    first = _clip_warnings(lambda: model(x))
    assert len(first) == 1 and "block 1: r=7 clipped to 4" in str(first[0].message)
    assert (first[0].filename, first[0].lineno) == (__file__, line)
    assert _clip_warnings(lambda: model(x)) == []  # after a catch_warnings block too
    assert _clip_warnings(lambda: model.forward_features(x)) == []
    handle.r = 8  # a new setting is said again, once
    line = inspect.currentframe().f_lineno + 1
    (said,) = _clip_warnings(lambda: model.forward_features(x))
    assert (said.filename, said.lineno) == (__file__, line)
    assert _clip_warnings(lambda: model(x)) == []


def test_r_list_longer_than_the_blocks_is_refused_at_apply_and_on_the_handle() -> None:
    model = make_vit()
    with pytest.raises(ValueError, match=f"r lists {DEPTH + 1} blocks but the model has {DEPTH}"):
        ta.apply(model, r=[1] * (DEPTH + 1))
    assert ta.handle_of(model) is None  # nothing half-patched
    handle = ta.apply(model, r=[1] * DEPTH)
    with pytest.raises(ValueError, match=f"r lists {DEPTH + 2} blocks but the model has {DEPTH}"):
        handle.r = [1] * (DEPTH + 2)
    assert handle.r == (1,) * DEPTH  # the refused setting changed nothing
    with torch.no_grad():
        model(images())
    assert handle.last_state.token_counts == expected_counts(PATCHES + 1, 1, [1] * DEPTH)


def _live(kind: type) -> int:
    gc.collect()
    return sum(issubclass(type(o), kind) for o in gc.get_objects())  # type(): no __class__ lookups


def test_remove_releases_the_last_state_from_every_thread() -> None:
    """After remove no thread's context holds the patch's states; the remover's last state
    stays readable on the patch (``with patched(...) as p: ...; p.last_state``) until the
    patch object goes."""
    model, x = make_vit(), images()
    handle = ta.apply(model, r=2, trace_source=True)
    states, done, removed = {}, threading.Event(), threading.Event()

    def run(name: str) -> None:
        with torch.no_grad():
            model(x)
        states[name] = weakref.ref(handle.last_state)

    def worker_run() -> None:
        run("worker")
        done.set()
        removed.wait(timeout=60)  # alive (its context too) until the patch is removed

    worker = threading.Thread(target=worker_run)
    worker.start()
    run("main")
    assert done.wait(timeout=60)
    try:
        assert states["worker"]() is not None  # kept while patched, for inspection
        handle.remove()
        gc.collect()
        assert states["worker"]() is None
        assert handle.last_state is states["main"]()
        assert handle.last_state.token_counts == expected_counts(PATCHES + 1, 1, [2] * DEPTH)
    finally:
        removed.set()
        worker.join()
    handle = None  # the patch object goes
    gc.collect()
    assert states["main"]() is None


@pytest.mark.usefixtures("one_thread")  # 1,000 tiny forwards: threads only contend
def test_apply_forward_remove_cycles_keep_memory_flat() -> None:
    """1,000 cycles used to keep every patch's last state (sizes, sources) in the thread."""
    model, x = make_vit(), images(1)

    def cycles(count: int) -> None:
        for _ in range(count):
            handle = ta.apply(model, r=2, trace_source=True)
            with torch.no_grad():
                model(x)
            handle.remove()

    cycles(20)  # warm-up: lazy imports, caches
    tensors, states = _live(torch.Tensor), _live(ReductionState)
    cycles(1000)
    assert _live(torch.Tensor) <= tensors
    assert _live(ReductionState) <= states


# --------------------------------------------------------------- batch and dtype
@pytest.mark.parametrize("variant", ["cls", "avg", "distilled"])
def test_empty_batch_returns_what_the_unpatched_model_returns(variant: str) -> None:
    model = make_vit(variant)
    empty = torch.zeros(0, 3, 32, 32)
    with torch.no_grad():
        ref, ref_features = model(empty), model.forward_features(empty)
        handle = ta.apply(model, r=3, alpha=1.0, trace_source=True)
        out, features = model(empty), model.forward_features(empty)
    assert out.shape == ref.shape == (0, 10)
    prefix = handle.config.protected_tokens  # CLS, distillation token: none for avg
    counts = expected_counts(PATCHES + prefix, prefix, [3] * DEPTH)
    assert handle.last_state.token_counts == counts
    assert features.shape == (0, counts[-1], ref_features.shape[-1])
    assert features.dtype == ref_features.dtype


def test_batched_equals_per_sample() -> None:
    model = make_vit()
    x = images(5)
    handle = ta.apply(model, r=3, trace_source=True)
    with torch.no_grad():
        batched = model(x)
        batched_source = handle.last_state.source
        for i in range(5):
            single = model(x[i : i + 1])
            assert handle.last_state.token_counts == expected_counts(PATCHES + 1, 1, [3] * DEPTH)
            assert torch.equal(handle.last_state.source[0], batched_source[i])
            torch.testing.assert_close(single[0], batched[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["cls", "avg", "distilled"])
def test_bfloat16(variant: str) -> None:
    model = make_vit(variant).to(torch.bfloat16)
    x = images().to(torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        handle = ta.apply(model, r=0)
        same = model(x)
        handle.r = 3
        merged = model(x)
    assert same.dtype == merged.dtype == torch.bfloat16
    torch.testing.assert_close(same, ref, atol=5e-2, rtol=5e-2)
    assert torch.isfinite(merged.float()).all()
    assert handle.last_state.token_counts[-1] < PATCHES
    assert handle.last_state.size.dtype == torch.float32


@pytest.mark.parametrize("variant", ["cls", "avg", "layerscale"])
def test_gradients_are_finite(variant: str) -> None:
    model = make_vit(variant).train()
    x = images().requires_grad_(True)
    handle = ta.apply(model, r=3, alpha=1.0)
    model(x).logsumexp(-1).sum().backward()
    assert handle.last_state.token_counts[-1] < PATCHES
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_grad_checkpointing_is_refused() -> None:
    model = make_vit().train()
    model.set_grad_checkpointing(True)
    ta.apply(model, r=2)
    with pytest.raises(RuntimeError, match="grad_checkpointing"):
        model(images())


# ----------------------------------------------------------------- pruned heads
def _prune_heads(model: nn.Module, keep: int) -> None:
    """Slice every block's qkv/proj Linear to the first ``keep`` heads; set nothing else."""
    for blk in model.blocks:
        attn = blk.attn
        width, dim = attn.num_heads * attn.head_dim, attn.qkv.in_features
        rows = torch.cat([torch.arange(keep * attn.head_dim) + i * width for i in range(3)])
        qkv = nn.Linear(dim, rows.numel(), bias=attn.qkv.bias is not None)
        qkv.weight.data.copy_(attn.qkv.weight.data[rows])
        if attn.qkv.bias is not None:
            qkv.bias.data.copy_(attn.qkv.bias.data[rows])
        proj = nn.Linear(keep * attn.head_dim, attn.proj.out_features)
        proj.weight.data.copy_(attn.proj.weight.data[:, : keep * attn.head_dim])
        proj.bias.data.copy_(attn.proj.bias.data)
        attn.qkv, attn.proj = qkv, proj


def test_pruned_heads_run_patched() -> None:
    model = make_vit(qkv_bias=True)
    _prune_heads(model, keep=2)
    # oracle: the same pruned weights with timm told the new head count
    oracle = copy.deepcopy(model)
    for blk in oracle.blocks:
        blk.attn.num_heads, blk.attn.attn_dim = 2, 2 * blk.attn.head_dim
    x = images()
    with torch.no_grad():
        ref = oracle(x)
        handle = ta.apply(model, r=0)
        same = model(x)
        handle.r = 3
        merged = model(x)
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(merged).all()
    assert handle.last_state.token_counts == expected_counts(PATCHES + 1, 1, [3] * DEPTH)


def test_settings_precedence_preset_model_config_keywords() -> None:
    # preset < the model's defaults < an explicit config < keyword overrides
    model = make_vit("registers")  # CLS + 4 registers
    prefix = model.num_prefix_tokens
    with ta.patched(model, "reference") as patch:
        assert patch.config.protected == prefix and patch.config.alpha == 5.0
    with ta.patched(model, TurboConfig(r=2, protected=prefix + 2)) as patch:
        assert patch.config.protected == prefix + 2  # the explicit config wins
    with ta.patched(model, TurboConfig(r=2, protected=prefix + 2), protected=prefix + 3) as patch:
        assert patch.config.protected == prefix + 3  # and a keyword beats it
    with pytest.raises(ValueError, match="protected must be >= 5"):
        ta.apply(model, TurboConfig(r=2, protected=1))  # a register token would merge
    assert ta.handle_of(model) is None  # a refused patch leaves nothing behind
