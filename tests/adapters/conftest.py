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
