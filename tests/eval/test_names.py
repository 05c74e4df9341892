"""turbo_eval.names: the one method table and the one grammar that reads method names."""

from __future__ import annotations

import pytest

pytest.importorskip("turbo_eval")

from turbo_eval import methods, names
from turbo_eval.commands import report


@pytest.mark.parametrize(
    ("method", "valid", "kind", "partner"),
    [
        ("turbo", True, "plain", None),
        ("turbo+int8", True, "plain", None),
        ("int8", True, "plain", None),  # a side alone runs on the unpatched model
        ("baseline+int8", False, "plain", None),  # the side alone says that
        ("turbo-cross", True, "cross", "turbo"),
        ("semantics-cross+gptq", True, "cross", "semantics+gptq"),
        ("redundancy-sizebias+prune", True, "sizebias", "redundancy+prune"),
        ("tomesd", True, "peer", None),
        ("tomesd+int8", False, "peer", None),  # a peer never stacks on a side
        ("turbo+fp8", False, "plain", None),
        ("nope", False, None, None),
    ],
)
def test_the_grammar_reads_every_form(method, valid, kind, partner) -> None:
    assert names.is_method(method) is valid
    assert names.method_kind(method) == kind
    assert names.partner_method(method) == partner


def test_every_list_of_methods_comes_from_the_table() -> None:
    table = list(names.METHOD_TABLE)
    assert list(methods.LABELS) == table  # one label per method, in table order
    assert list(report.METHOD_ORDER) == table
    assert sorted(report.METHOD_ORDER.values()) == list(range(len(table)))
    assert set(report.STYLES) == set(table)
    grouped = names.METHODS + names.CROSS_METHODS + names.SIZE_BIAS_METHODS + names.PEER_METHODS
    assert sorted(grouped) == sorted(table)  # each method in exactly one group
    assert set(names.ALPHA_METHODS) == {"turbo", "turbo-cross", "turbo-sizebias"}
    assert len({info.style for info in names.METHOD_TABLE.values()}) == len(table)  # drawn apart
