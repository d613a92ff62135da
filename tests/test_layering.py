"""Layers point one way: which package may import which, checked on the source with ``ast``.

The rules (DESIGN.md, "Layers point one way"):

* ``hsm`` imports nothing from ``switch`` (its operator commands live in ``switch/cli/``);
* ``hsm/pan.py``, the card-data module below every layer, imports only the standard library;
* ``switch/wire`` is sans-IO: from this repository it imports only ``switch.wire`` itself and
  ``hsm.pan``, and it does not log (no ``structlog``);
* ``switch`` uses the HSM layer through its public modules only, never its backends or
  algorithms.

Imports inside functions count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: ``hsm`` modules allowed to import ``switch``, with the reason.
HSM_IMPORTS_SWITCH_EXEMPT: set[str] = set()
#: The ``hsm`` modules ``switch`` may import: the command interface and its values, errors,
#: card-data rules, configuration, opening the backend and the card-data vault.
SWITCH_MAY_IMPORT_FROM_HSM = frozenset(
    {"hsm.api", "hsm.errors", "hsm.pan", "hsm.token", "hsm.carddata", "hsm.config"}
)
#: ``switch`` modules allowed to import other ``hsm`` modules, with the reason.
SWITCH_IMPORTS_HSM_EXEMPT = {
    # The acquirer simulator plays the PIN pad: it builds a PIN block under a clear test ZPK
    # with the software primitive, which is no HSM command.
    "switch/acquirer.py",
    # The key custodian's command prints the KCV of a key value it was given, as computed
    # from the value itself, to compare with the HSM's.
    "switch/cli/hsm.py",
}
#: Repository modules the wire layer may import besides its own package.
WIRE_MAY_IMPORT = frozenset({"hsm.pan"})


@dataclass(frozen=True)
class Import:
    """One imported module, where it is imported and by what statement's line."""

    source: str
    line: int
    module: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.module}"


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _package_of(rel: str) -> list[str]:
    parts = Path(rel).with_suffix("").parts
    return list(parts if parts[-1] == "__init__" else parts[:-1])


def imports_of(rel: str, source: str) -> Iterator[Import]:
    """Every module imported by ``source`` (the text of repository file ``rel``).

    ``from package import name`` yields ``package.name`` when that is a module of the
    repository, so ``from switch import metrics`` names ``switch.metrics``. Relative imports
    are resolved against the file's package.
    """
    for node in ast.walk(ast.parse(source, rel)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(rel, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(rel)
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Import(rel, node.lineno, sub if _is_module(sub) else base)


def _files(*roots: str) -> list[str]:
    found: list[str] = []
    for root in roots:
        path = REPO / root
        found += [
            str(p.relative_to(REPO)) for p in (path.rglob("*.py") if path.is_dir() else [path])
        ]
    return sorted(found)


def _repo_imports(*roots: str) -> list[Import]:
    return [imp for rel in _files(*roots) for imp in imports_of(rel, (REPO / rel).read_text())]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _top(module: str) -> str:
    return module.partition(".")[0]


# ------------------------------------------------------------------------------ the rules


def hsm_imports_no_switch(imp: Import) -> str | None:
    if imp.source in HSM_IMPORTS_SWITCH_EXEMPT or not _within(imp.module, "switch"):
        return None
    return "hsm must not import switch"


def pan_imports_only_stdlib(imp: Import) -> str | None:
    if imp.module == "__future__" or _top(imp.module) in sys.stdlib_module_names:
        return None
    return "hsm/pan.py imports only the standard library"


def wire_is_self_contained(imp: Import) -> str | None:
    if _top(imp.module) == "structlog":
        return "switch/wire does not log (no structlog)"
    if _within(imp.module, "switch.wire") or imp.module in WIRE_MAY_IMPORT:
        return None
    if _top(imp.module) in ("switch", "hsm"):
        return "switch/wire imports only switch.wire and hsm.pan from this repository"
    return None


def switch_uses_public_hsm(imp: Import) -> str | None:
    if imp.source in SWITCH_IMPORTS_HSM_EXEMPT or _top(imp.module) != "hsm":
        return None
    if imp.module in SWITCH_MAY_IMPORT_FROM_HSM:
        return None
    allowed = ", ".join(sorted(SWITCH_MAY_IMPORT_FROM_HSM))
    return f"switch may import from hsm only {allowed}"


Rule = Callable[[Import], "str | None"]
#: Each rule with the files it applies to.
RULES: dict[str, tuple[tuple[str, ...], Rule]] = {
    "hsm-imports-no-switch": (("hsm",), hsm_imports_no_switch),
    "pan-imports-only-stdlib": (("hsm/pan.py",), pan_imports_only_stdlib),
    "wire-is-self-contained": (("switch/wire",), wire_is_self_contained),
    "switch-uses-public-hsm": (("switch",), switch_uses_public_hsm),
}


def violations(rule: Rule, found: list[Import]) -> list[str]:
    """One readable line per import that breaks ``rule``: file, line, module and the rule."""
    out = []
    for imp in found:
        broken = rule(imp)
        if broken is not None:
            out.append(f"{imp}: {broken}")
    return out


@pytest.mark.parametrize("name", sorted(RULES))
def test_layer_rule(name: str) -> None:
    roots, rule = RULES[name]
    found = _repo_imports(*roots)
    assert found, f"no imports found under {roots}: the checker reads nothing"
    broken = violations(rule, found)
    assert not broken, "layering broken:\n  " + "\n  ".join(broken)


def test_exemptions_still_exist() -> None:
    """An exemption for a file that is gone (or moved) must be dropped, not kept silently."""
    for rel in HSM_IMPORTS_SWITCH_EXEMPT | SWITCH_IMPORTS_HSM_EXEMPT:
        assert (REPO / rel).is_file(), f"exempted {rel} no longer exists: remove the exemption"


def test_the_checker_names_module_and_import() -> None:
    source = (
        "from switch import metrics\n"
        "def f():\n"
        "    import structlog\n"
        "    from .framing import WireError\n"
        "    from hsm.algorithms.emv import arqc_data\n"
    )
    found = list(imports_of("switch/wire/codec.py", source))
    assert [str(i) for i in found] == [
        "switch/wire/codec.py:1 imports switch.metrics",
        "switch/wire/codec.py:3 imports structlog",
        "switch/wire/codec.py:4 imports switch.wire.framing",
        "switch/wire/codec.py:5 imports hsm.algorithms.emv",
    ]
    assert violations(wire_is_self_contained, found) == [
        "switch/wire/codec.py:1 imports switch.metrics: "
        "switch/wire imports only switch.wire and hsm.pan from this repository",
        "switch/wire/codec.py:3 imports structlog: switch/wire does not log (no structlog)",
        "switch/wire/codec.py:5 imports hsm.algorithms.emv: "
        "switch/wire imports only switch.wire and hsm.pan from this repository",
    ]
    assert violations(pan_imports_only_stdlib, list(imports_of("hsm/pan.py", source)))[0] == (
        "hsm/pan.py:1 imports switch.metrics: hsm/pan.py imports only the standard library"
    )
