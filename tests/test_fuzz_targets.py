"""CI-sized fuzzing of the wire layer and the session policy with hypothesis.

Each target of tests/fuzz/targets.py runs on random bytes (``binary()``) and on mutations of
its seed corpus (tests/fuzz/corpus/<target>/: bytes flipped, inserted, deleted, cut). The
default size keeps the default suite short; ``CARDSWITCH_FUZZ_EXAMPLES`` runs it long (``make
soak``), and the atheris driver (tests/fuzz/run.py) fuzzes the same targets with coverage
feedback. A failing input goes to tests/fuzz/crashers/<target>/ (as hypothesis prints it),
where tests/test_fuzz_regressions.py replays it.
"""

from __future__ import annotations

import os
from functools import cache

import pytest
from fuzz.targets import CORPUS_DIR, TARGETS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("CARDSWITCH_FUZZ_EXAMPLES", "120"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@cache
def seeds(target: str) -> tuple[bytes, ...]:
    return tuple(
        p.read_bytes() for p in sorted((CORPUS_DIR / target).iterdir()) if p.suffix != ".json"
    )


@st.composite
def mutated(draw: st.DrawFn, target: str) -> bytes:
    """A seed of ``target`` with a few bytes flipped, inserted or deleted, or cut short."""
    data = bytearray(draw(st.sampled_from(seeds(target))))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut", "splice"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[at:]
        else:  # a piece of another seed
            other = draw(st.sampled_from(seeds(target)))
            start = draw(st.integers(0, len(other)))
            data[at:at] = other[start : start + draw(st.integers(1, 64))]
    return bytes(data)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_random_bytes(target: str) -> None:
    @FUZZ_SETTINGS
    @given(st.binary(max_size=512))
    def run(data: bytes) -> None:
        TARGETS[target](data)

    run()


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_mutated_seeds(target: str) -> None:
    @FUZZ_SETTINGS
    @given(mutated(target))
    def run(data: bytes) -> None:
        TARGETS[target](data)

    run()
