"""The atheris (libFuzzer) driver of the fuzz targets: coverage-guided, for long runs.

    PYTHONPATH=$PWD:$PWD/tests python -m fuzz.run TARGET [libFuzzer options]

``TARGET`` is a name of ``fuzz.targets.TARGETS``. The corpus directory is
tests/fuzz/corpus/TARGET (new interesting inputs are added to a scratch copy in
var/fuzz/TARGET, not to the committed seeds) and crash artifacts are written to
tests/fuzz/crashers/TARGET/, where tests/test_fuzz_regressions.py replays them. Typical
options: ``-runs=1000000`` or ``-max_total_time=600``. Needs the ``fuzz`` extra (atheris).

What does not live here: the targets (targets.py), the CI-sized hypothesis runs
(tests/test_fuzz_targets.py).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["switch", "hsm"]):
    from fuzz.targets import CORPUS_DIR, CRASHERS_DIR, TARGETS

#: Scratch corpus of a run (the fuzzer grows it); seeded from the committed corpus.
SCRATCH = Path("var") / "fuzz"


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz.run {{{','.join(sorted(TARGETS))}}} [libFuzzer options]")
    name = argv[1]
    scratch = SCRATCH / name
    scratch.mkdir(parents=True, exist_ok=True)
    for seed in (CORPUS_DIR / name).iterdir():
        if seed.is_file() and seed.suffix != ".json":
            shutil.copy(seed, scratch / seed.name)
    crashers = CRASHERS_DIR / name
    crashers.mkdir(parents=True, exist_ok=True)
    args = [argv[0], *argv[2:], f"-artifact_prefix={crashers}/", str(scratch)]
    atheris.Setup(args, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
