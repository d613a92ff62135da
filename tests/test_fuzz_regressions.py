"""Every fuzz crasher kept, and every seed of the corpus, replayed through its target.

A crasher is a file in tests/fuzz/crashers/<target>/ (libFuzzer's ``crash-<sha1>`` artifact
as atheris writes it, or an input hypothesis found, written as bytes); it stays there once
fixed, so the defect cannot come back unseen. The seeds (tests/fuzz/corpus/<target>/) must
pass too: a target that fails on its own corpus fuzzes nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz.targets import CORPUS_DIR, CRASHERS_DIR, TARGETS


def _inputs(root: Path) -> list[tuple[str, Path]]:
    return [
        (target, path)
        for target in sorted(TARGETS)
        if (root / target).is_dir()
        for path in sorted((root / target).iterdir())
        if path.is_file() and path.suffix not in (".json", ".md")
    ]


CRASHERS = _inputs(CRASHERS_DIR)


@pytest.mark.parametrize(("target", "path"), CRASHERS, ids=[f"{t}/{p.name}" for t, p in CRASHERS])
def test_crasher_stays_fixed(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seed_corpus_passes(target: str) -> None:
    inputs = [p for t, p in _inputs(CORPUS_DIR) if t == target]
    assert len(inputs) >= 10, "the seed corpus is missing (python -m fuzz.build_corpus)"
    for path in inputs:
        TARGETS[target](path.read_bytes())


def test_crashers_directory_is_kept() -> None:
    assert (CRASHERS_DIR / "README.md").is_file()
