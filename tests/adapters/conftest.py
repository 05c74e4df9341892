import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: thread start-up costs more than it saves, and CI has 2 cores.

    Modules of tiny-model tests opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """A test that leaves autograd off breaks every later gradient test far from the cause
    (a benchmark's ``main`` once did): fail the leaking test itself instead."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left autograd switched off (a global torch.set_grad_enabled(False))")
