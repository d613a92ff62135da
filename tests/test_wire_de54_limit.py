"""DE54 carries 12 digits: a larger balance is refused at construction, never sent wrong."""

from __future__ import annotations

import pytest

from switch.wire.messages import AdditionalAmount


def test_twelve_digits_fit_thirteen_do_not() -> None:
    assert AdditionalAmount("00", "02", "978", 999_999_999_999).to_text().endswith("C999999999999")
    assert AdditionalAmount.fits(-999_999_999_999)
    assert not AdditionalAmount.fits(10**12)
    with pytest.raises(ValueError, match="12 digits"):
        AdditionalAmount("00", "02", "978", 10**12)
