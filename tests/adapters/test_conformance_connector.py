"""Every family's connector stage through the connector kit (turbo_adapters.connector.testing):
keep-all equals unpatched greedy tokens, remove is exact, batch rows equal single rows,
counts follow the budget, accelerate hooks."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from support.connector_cases import CASES

from turbo_adapters.connector.testing import CONNECTOR_CHECKS, run_connector_check

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("check", sorted(CONNECTOR_CHECKS))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_connector_conformance(case, check) -> None:
    run_connector_check(case, check)
