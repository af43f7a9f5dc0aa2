"""Shared pytest set-up: registers the MPI harness (see tests/mpi_harness.py); fixtures
more than one test file uses."""
import sys

import pytest

from tests.mpi_harness import (  # noqa: F401  (pytest finds the hooks by name)
    pytest_configure,
    pytest_generate_tests,
    pytest_itemcollected,
    pytest_pyfunc_call,
    pytest_terminal_summary,
    pytest_unconfigure,
)


@pytest.fixture(autouse=True)
def _restore_distconv_default_dtype():
    """Undo a test's dc.set_default_dtype so tests don't depend on their order."""
    be = sys.modules.get("distconv.backend")
    saved = be.get_default_dtype() if be is not None else None
    yield
    be = sys.modules.get("distconv.backend")
    if be is not None:
        be.set_default_dtype(saved if saved is not None else "float32")


@pytest.fixture
def torch1():
    """torch on one thread (much faster than two on a small, shared machine), restored."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(n)
