"""Run the doctests of the wire modules (examples in docstrings stay true)."""

from __future__ import annotations

import doctest
from types import ModuleType

import pytest

from switch.wire import codec, emv, framing, messages, spec


@pytest.mark.parametrize("module", [codec, emv, framing, messages, spec], ids=lambda m: m.__name__)
def test_doctests(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
