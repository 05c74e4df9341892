"""The connector stage's conformance kit: what every family's connector stage must satisfy.

Public like :mod:`turbo_adapters.testing` (pytest is needed to run it). A family joins
with one :class:`ConnectorCase`; the checks run a connector method given by name (a test
registers its own, e.g. "keep the first K", until the library's methods are in)::

    @pytest.mark.parametrize("check", sorted(CONNECTOR_CHECKS))
    def test_connector(check):
        run_connector_check(CASE, check)

Oracles: the unpatched model (keep-all, after ``remove``, under accelerate hooks), single
rows (batch), and :func:`~turbo_adapters.connector.connector_counts` written against the
images' token counts the case states.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import api as ta
from ..patch import handle_of
from .budget import Budget, ConnectorReduction, connector_counts
from .record import last_connector

__all__ = ["CONNECTOR_CHECKS", "ConnectorCase", "run_connector_check"]


@dataclasses.dataclass
class ConnectorCase:
    """One family's entry in the connector kit.

    Attributes:
        id: test id.
        build: a tiny seeded model in eval mode (generate-capable).
        feed: ``feed(rows)`` -> keyword arguments of a call with one row per entry of
            ``rows`` (an int naming the row's prompt and images; the same int gives the
            same row alone or in a batch).
        tokens: ``tokens(rows)`` -> each image's token count before the stage, in order.
        method: the connector method's name the checks use.
        budget: a budget that reduces every image of ``feed(batch_rows)``.
        batch_rows: the rows of the batched checks (different images per row).
        new_tokens: greedy tokens generated per check.
        offload: None to run the accelerate check with ``cpu_offload``, else why the
            unpatched model cannot be offloaded (the check then uses accelerate's
            device-alignment hooks on every module, as the tower kit does).
    """

    id: str
    build: Callable[[], nn.Module]
    feed: Callable[[list[int]], dict[str, Any]]
    tokens: Callable[[list[int]], list[int]]
    method: str
    budget: Budget = 3
    batch_rows: tuple[int, ...] = (0, 1, 2)
    new_tokens: int = 4
    offload: str | None = None


def _patch(case: ConnectorCase, model: nn.Module, budget: Budget) -> Any:
    patch = handle_of(model) or ta.apply(model)
    patch.connector = ConnectorReduction(budget=budget, method=case.method)
    patch.modes = "connector"
    return patch


def _generate(case: ConnectorCase, model: nn.Module, feed: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **feed, max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens,
            do_sample=False,
        )  # fmt: skip


def _logits(model: nn.Module, feed: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**feed).logits[:, -1]


def check_keep_all_equals_unpatched(case: ConnectorCase) -> None:
    model = case.build()
    feed = case.feed(list(case.batch_rows))
    ref_tokens, ref_logits = _generate(case, model, feed), _logits(model, feed)
    biggest = max(case.tokens(list(case.batch_rows)))
    for budget in (1.0, biggest):
        patch = _patch(case, model, budget)
        assert torch.equal(_generate(case, model, feed), ref_tokens)
        torch.testing.assert_close(_logits(model, feed), ref_logits, atol=1e-6, rtol=1e-6)
        record = last_connector(patch)
        assert record is not None and record.tokens_out == record.tokens_in


def check_remove_restores_exactly(case: ConnectorCase) -> None:
    model = case.build()
    feed = case.feed(list(case.batch_rows))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref_tokens, ref_logits = _generate(case, model, feed), _logits(model, feed)
    # after a first call: transformers adds its output-capturing hooks then
    dicts = [set(m.__dict__) for m in model.modules()]
    patch = _patch(case, model, case.budget)
    reduced = _logits(model, feed)
    _generate(case, model, feed)
    record = last_connector(patch)
    assert record is not None and sum(record.tokens_out) < sum(record.tokens_in)
    assert not torch.equal(reduced, ref_logits)  # the stage acted
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ta.remove(model)
    assert torch.equal(_logits(model, feed), ref_logits)
    assert torch.equal(_generate(case, model, feed), ref_tokens)
    assert [set(m.__dict__) for m in model.modules()] == dicts
    assert handle_of(model) is None


def check_batch_equals_single(case: ConnectorCase) -> None:
    model = case.build()
    rows = list(case.batch_rows)
    patch = _patch(case, model, case.budget)
    feed = case.feed(rows)
    batched = _generate(case, model, feed)[:, feed["input_ids"].shape[1] :]
    batched_logits = _logits(model, feed)
    counts = last_connector(patch).tokens_out
    singles = []
    for b, row in enumerate(rows):
        one = case.feed([row])
        got = _generate(case, model, one)[:, one["input_ids"].shape[1] :]
        assert torch.equal(got[0], batched[b]), (row, got, batched[b])
        torch.testing.assert_close(_logits(model, one)[0], batched_logits[b], atol=1e-4, rtol=1e-4)
        singles += last_connector(patch).tokens_out
    assert tuple(singles) == counts


def check_counts_follow_budget(case: ConnectorCase) -> None:
    model = case.build()
    rows = list(case.batch_rows)
    feed = case.feed(rows)
    tokens = case.tokens(rows)
    for budget in (1, case.budget, 0.5, 0.3, tuple(range(1, len(tokens) + 1))):
        patch = _patch(case, model, budget)
        with torch.no_grad():
            logits = model(**feed).logits
        record = last_connector(patch)
        expected = connector_counts(budget, tokens)
        assert record.tokens_in == tuple(tokens)
        assert list(record.tokens_out) == expected, (budget, record.tokens_out, expected)
        # the sequence the language model saw: every row shortened by its images' cuts
        cut = [0] * len(rows)
        image = 0
        ids = feed["input_ids"]
        image_token = _image_token(model)
        per_row = (ids == image_token).sum(-1).tolist()
        for b, placeholders in enumerate(per_row):
            while placeholders > 0:
                placeholders -= tokens[image]
                cut[b] += tokens[image] - expected[image]
                image += 1
        mask = feed.get("attention_mask")
        lengths = mask.sum(-1).tolist() if mask is not None else [ids.shape[1]] * len(rows)
        assert logits.shape[1] == max(n - c for n, c in zip(lengths, cut, strict=True))


def _image_token(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "image_token_id", None) or config.image_token_index)


def _dispatch(case: ConnectorCase, model: nn.Module) -> None:
    from accelerate import cpu_offload
    from accelerate.hooks import attach_align_device_hook

    if case.offload is None:
        cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        attach_align_device_hook(model, execution_device=torch.device("cpu"))


def check_accelerate_hooks(case: ConnectorCase) -> None:
    from accelerate.hooks import remove_hook_from_submodules

    feed = case.feed(list(case.batch_rows))
    model = case.build()
    ref = _logits(model, feed)
    _patch(case, model, case.budget)
    want_tokens, want_logits = _generate(case, model, feed), _logits(model, feed)
    ta.remove(model)
    # hooks before apply
    model = case.build()
    _dispatch(case, model)
    patch = _patch(case, model, case.budget)
    torch.testing.assert_close(_logits(model, feed), want_logits)
    assert torch.equal(_generate(case, model, feed), want_tokens)
    assert sum(last_connector(patch).tokens_out) < sum(last_connector(patch).tokens_in)
    ta.remove(model)
    torch.testing.assert_close(_logits(model, feed), ref)
    remove_hook_from_submodules(model)
    # hooks after apply
    model = case.build()
    patch = _patch(case, model, case.budget)
    _dispatch(case, model)
    torch.testing.assert_close(_logits(model, feed), want_logits)
    ta.remove(model)
    torch.testing.assert_close(_logits(model, feed), ref)


CONNECTOR_CHECKS: dict[str, Callable[[ConnectorCase], None]] = {
    "keep_all_equals_unpatched": check_keep_all_equals_unpatched,
    "remove_restores_exactly": check_remove_restores_exactly,
    "batch_equals_single": check_batch_equals_single,
    "counts_follow_budget": check_counts_follow_budget,
    "accelerate_hooks": check_accelerate_hooks,
}


def run_connector_check(case: ConnectorCase, name: str) -> None:
    """Run one connector check on ``case``."""
    if name not in CONNECTOR_CHECKS:
        raise ValueError(f"check must be one of {sorted(CONNECTOR_CHECKS)}, got {name!r}")
    CONNECTOR_CHECKS[name](case)
