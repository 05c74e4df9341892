"""InternVL's tower stage: Turbo merges inside InternViT (CLS guide) while tower mode is
active and hands the full grid back before the pixel shuffle. Oracles: the unpatched model
(keep-all, remove) and the unpatched shuffle + projector applied by hand to the patched
tower's restored output."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from support import tiny_prefix_vlms as tp

import turbo_adapters as ta
from turbo_adapters.method_support import method_support
from turbo_adapters.patch import handle_of
from turbo_adapters.testing import expected_counts
from turbo_core import Target

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 4
ROWS = [0, 1, 2]
TOKENS = (32 // 4) ** 2 + 1  # InternViT's patches of the tiny 32 px tile + CLS


def _generate(model, feed: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **feed, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kwargs
        )


def _logits(model, feed: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**feed, **kwargs).logits


def test_keep_all_equals_the_unpatched_model() -> None:
    model = tp.build_internvl()
    feed = tp.internvl_feed(ROWS)
    want_tokens, want_logits = _generate(model, feed), _logits(model, feed)
    patch = ta.apply(model, r=0)
    patch.modes = "tower"
    got_logits = _logits(model, feed)
    assert patch.last_state is not None  # the tower ran under Turbo
    assert patch.last_state.token_counts[-1] == TOKENS
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(_generate(model, feed), want_tokens)
    assert torch.equal(_generate(model, feed, turbo_mode="tower"), want_tokens)


def test_tower_merges_and_restores_the_grid_before_the_shuffle() -> None:
    model = tp.build_internvl()
    feed = tp.internvl_feed(ROWS)
    plain_logits = _logits(model, feed)
    patch = ta.apply(model, r=8)
    patch.modes = "tower"
    inner = model.model
    with torch.no_grad():
        restored = inner.vision_tower(pixel_values=feed["pixel_values"]).last_hidden_state
        got = inner.get_image_features(
            pixel_values=feed["pixel_values"], return_dict=True
        ).pooler_output
    kept = patch.last_state.token_counts[-1]
    assert kept < TOKENS
    assert restored.shape[1] == TOKENS
    # every original token carries its merged token's value
    assert all(len(torch.unique(row, dim=0)) == kept for row in restored)
    # the unpatched shuffle and projector, by hand, on the restored tokens (CLS dropped)
    patches = restored[:, 1:]
    side = int(patches.shape[1] ** 0.5)
    with torch.no_grad():
        grid = inner.pixel_shuffle(
            patches.reshape(len(patches), side, side, -1), inner.config.downsample_ratio
        )
        want = inner.multi_modal_projector(grid.reshape(len(patches), -1, grid.shape[-1]))
    torch.testing.assert_close(got, want)
    # the language model sees the unpatched token count; forward and generate run
    logits = _logits(model, feed)
    assert logits.shape == plain_logits.shape
    assert not torch.allclose(logits, plain_logits, atol=1e-4)
    out = _generate(model, feed)
    assert out.shape == (len(ROWS), feed["input_ids"].shape[1] + NEW)
    assert torch.equal(out[:, : feed["input_ids"].shape[1]], feed["input_ids"])
    # a call in another mode leaves the tower alone
    torch.testing.assert_close(
        _logits(model, feed, turbo_mode="none"), plain_logits, atol=1e-6, rtol=1e-6
    )


def test_remove_restores_exactly() -> None:
    model = tp.build_internvl()
    feed = tp.internvl_feed(ROWS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref_tokens, ref_logits = _generate(model, feed), _logits(model, feed)
    dicts = [set(m.__dict__) for m in model.modules()]  # after transformers' first-call hooks
    patch = ta.apply(model, r=8)
    patch.modes = "tower"
    assert not torch.allclose(_logits(model, feed), ref_logits, atol=1e-4)  # it acted
    _generate(model, feed)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ta.remove(model)
    assert torch.equal(_logits(model, feed), ref_logits)
    assert torch.equal(_generate(model, feed), ref_tokens)
    assert [set(m.__dict__) for m in model.modules()] == dicts
    assert handle_of(model) is None


def test_tower_is_refused_where_an_intermediate_layer_is_read() -> None:
    model = tp.build_internvl(vision_feature_layer=-2)
    feed = tp.internvl_feed([0])
    patch = ta.apply(model)
    assert not patch.tower_available
    with pytest.raises(
        ValueError, match=r"tower mode is not available: InternVL reads vision_feature_layer=-2"
    ):
        patch.modes = "tower"
    assert _logits(model, feed).shape[1] < feed["input_ids"].shape[1]  # the connector runs
    ta.remove(model)
    # a model that reads the last layer, a call in tower mode that reads another
    model = tp.build_internvl()
    ta.apply(model).modes = "tower"
    with pytest.raises(ValueError, match=r"tower mode: InternVL reads vision_feature_layer=-2"):
        _logits(model, feed, vision_feature_layer=-2)


def test_turbo_eval_methods_lists_the_tower_stage() -> None:
    rows = {(row.method, row.stage): row for row in method_support()}
    assert "internvl" in rows["turbo", "tower"].families
    assert "vision_feature_layer" in rows["turbo", "tower"].limits["internvl"]
    assert ta.get_adapter("internvl").stages == ("tower", "connector", "llm")


def test_tower_under_accelerate_hooks() -> None:
    """accelerate's cpu_offload, added before and after apply: tower mode gives the patched
    model's logits, greedy tokens and counts without hooks, the hooks still run around
    every InternViT layer, and remove() leaves every hook (and accelerate's forward) as it
    was, with the unpatched logits and tokens."""
    pytest.importorskip("accelerate")
    from accelerate import cpu_offload
    from support.accelerate_hooks import count_calls, hooks_of

    feed = tp.internvl_feed(ROWS)
    model = tp.build_internvl()
    ref_tokens, ref_logits = _generate(model, feed), _logits(model, feed)
    patch = ta.apply(model, r=8)
    patch.modes = "tower"
    want_logits, want_counts = _logits(model, feed), list(patch.last_state.token_counts)
    want_tokens = _generate(model, feed)
    assert want_counts[-1] < TOKENS
    ta.remove(model)

    def layers(model) -> list:
        return list(model.model.vision_tower.encoder.layer)

    for hooks_first in (True, False):
        model = tp.build_internvl()
        if not hooks_first:
            patch = ta.apply(model, r=8)
            patch.modes = "tower"
        cpu_offload(model, execution_device=torch.device("cpu"))
        counting = count_calls(layers(model))
        hooks = hooks_of(model)
        assert len(hooks) > len(layers(model))
        if hooks_first:
            patch = ta.apply(model, r=8)
            patch.modes = "tower"
        before = counting.calls
        got = _logits(model, feed)
        assert counting.calls - before == len(layers(model))
        assert list(patch.last_state.token_counts) == want_counts
        torch.testing.assert_close(got, want_logits, atol=1e-6, rtol=1e-6)
        assert torch.equal(_generate(model, feed), want_tokens)
        ta.remove(model)
        assert hooks_of(model) == hooks
        before = counting.calls
        torch.testing.assert_close(_logits(model, feed), ref_logits, atol=1e-6, rtol=1e-6)
        assert counting.calls - before == len(layers(model))
        assert torch.equal(_generate(model, feed), ref_tokens)


@pytest.mark.parametrize("r", [3, [5, 0], (3, -1.0), Target(TOKENS - 4)], ids=str)
def test_tower_counts_follow_the_schedule(r) -> None:
    """Every tile's InternViT tokens after each layer follow the bipartite count rule of
    the resolved schedule (CLS protected); the language model still sees the full count."""
    model = tp.build_internvl()
    feed = tp.internvl_feed(ROWS)
    plain = _logits(model, feed)
    patch = ta.apply(model, r=r)
    patch.modes = "tower"
    logits = _logits(model, feed)
    depth = len(model.model.vision_tower.encoder.layer)
    counts = list(patch.last_state.token_counts)
    if isinstance(r, Target):  # one token per layer and more: reached exactly
        assert counts[-1] == TOKENS - 4
    else:
        schedule = list(ta.resolve_config(None, r=r).schedule(depth))
        assert counts == expected_counts(TOKENS, 1, schedule)
    assert counts[-1] < TOKENS and logits.shape == plain.shape


def test_tower_batch_rows_equal_single_rows() -> None:
    """Rows of one and two tiles, merged in one batch, equal each row alone (logits at the
    last position, greedy tokens, counts)."""
    model = tp.build_internvl()
    patch = ta.apply(model, r=8)
    patch.modes = "tower"
    feed = tp.internvl_feed(ROWS)
    logits, tokens = _logits(model, feed)[:, -1], _generate(model, feed)
    counts = list(patch.last_state.token_counts)
    assert counts[-1] < TOKENS
    for b, row in enumerate(ROWS):
        one = tp.internvl_feed([row])
        torch.testing.assert_close(_logits(model, one)[0, -1], logits[b], atol=1e-5, rtol=1e-5)
        assert list(patch.last_state.token_counts) == counts
        alone = _generate(model, one)[0, one["input_ids"].shape[1] :]
        assert torch.equal(alone, tokens[b, feed["input_ids"].shape[1] :])
