"""The package layout: stages import only the stages below them, and no module lives outside a stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "eora_ft"
# lowest first; a module may import its own stage and any stage before it
STAGES = ["utils", "kernels", "data", "compress", "init", "adapters", "train", "eval", "config", "run", "cli"]
TOP_LEVEL = {"__init__.py", "config.py", "peft_bridge.py"}  # peft_bridge: the deprecated alias, gone in 0.2
DEPRECATED_ALIASES = {"peft_bridge": "adapters"}


def _stage_of(module: str) -> str | None:
    """``eora_ft.init.eora`` -> ``init``; ``eora_ft.config`` -> ``config``; None outside eora_ft."""
    parts = module.split(".")
    if parts[0] != "eora_ft" or len(parts) == 1:
        return None
    return DEPRECATED_ALIASES.get(parts[1], parts[1])


def _module_name(path: Path) -> str:
    if path.is_relative_to(PACKAGE):
        parts = ("eora_ft",) + path.relative_to(PACKAGE).with_suffix("").parts
    else:  # kernels/ is installed as eora_ft.kernels
        parts = ("eora_ft", "kernels") + path.relative_to(ROOT / "kernels").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """Every eora_ft module ``path`` (the module ``module``, by default named from its place in the package)
    imports, at any depth (function-level imports count), with line numbers."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] == "eora_ft"]


def _sources() -> list[Path]:
    return sorted(p for p in list(PACKAGE.rglob("*.py")) + list((ROOT / "kernels").rglob("*.py"))
                  if "assets" not in p.parts)


def test_stages_import_only_lower_stages():
    violations = []
    for path in _sources():
        own = _stage_of(_module_name(path))
        if own is None:  # eora_ft/__init__.py
            continue
        for line, imported in _imports(path):
            target = _stage_of(imported)
            if target is not None and STAGES.index(target) > STAGES.index(own):
                violations.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {imported} ({target})")
    assert not violations, "a lower stage imports a higher one:\n" + "\n".join(violations)


def test_every_module_belongs_to_a_stage():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in TOP_LEVEL)
    assert not loose, f"modules outside a stage folder: {loose}; place them in one of {STAGES}"
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert set(folders) <= set(STAGES), f"stage folders {folders} not in the declared order {STAGES}"


@pytest.mark.parametrize("stage", [s for s in STAGES if s not in ("config", "kernels")])
def test_each_stage_says_what_it_owns(stage):
    doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
    assert doc and ("import" in doc.lower()), f"eora_ft/{stage}/__init__.py needs a docstring naming what it may import"


def test_the_checker_sees_a_violation(tmp_path):
    """The walk finds function-level and relative imports (a checker that finds nothing proves nothing)."""
    probe = tmp_path / "_layout_probe.py"  # read as if it were eora_ft/data/_layout_probe.py
    probe.write_text("def f():\n    from eora_ft.run import pipeline\n    from ..cli import main\n")
    imported = [name for _, name in _imports(probe, "eora_ft.data._layout_probe")]
    assert imported == ["eora_ft.run", "eora_ft.cli"]


def test_deprecated_alias_still_imports():
    with pytest.warns(FutureWarning, match="eora_ft.adapters"):
        import importlib
        import sys

        sys.modules.pop("eora_ft.peft_bridge", None)
        module = importlib.import_module("eora_ft.peft_bridge")
    from eora_ft.adapters import load_pretrained

    assert module.load_pretrained is load_pretrained


def test_every_stage_is_packaged():
    """A wheel holds what pyproject lists: a stage folder missing there would import only from a checkout."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"eora_ft." + p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders | {"eora_ft", "eora_ft.kernels"} == listed
