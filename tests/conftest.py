"""Hypothesis settings shared by the whole test suite: deterministic examples, no per-example deadline."""

from hypothesis import settings

settings.register_profile("ci", deadline=None, derandomize=True)
settings.load_profile("ci")

# The tests run thousands of tiny matrix products; with several BLAS/OpenMP threads on a busy 2-core machine
# each one spin-waits for the others (16 ms instead of 0.02 ms for a 12x108 @ 108x12 product). One thread
# keeps the suite fast and its timing independent of the machine's load. Code under test that sets its own
# thread count (the CLI's --threads, the C step's pool) is put back to one thread after every test.
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    yield
    torch.set_num_threads(1)
