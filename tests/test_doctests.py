"""Run the doctests of every module that has them (examples in docstrings stay true)."""

from __future__ import annotations

import doctest
from types import ModuleType

import pytest

from hsm import pan
from switch import decisions, proxy_protocol
from switch.store import models
from switch.wire import emv, framing, messages, spec

#: Modules whose docstrings carry examples.
MODULES = [pan, emv, framing, messages, spec, decisions, models, proxy_protocol]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_doctests(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
