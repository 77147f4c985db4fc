import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    # DreamLLM's end-to-end tests run many small ops: on a 2-core machine shared with other work,
    # torch's default two threads thrash (seen 10-60x slower), and one thread is as fast when idle
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
