"""pyproject.toml's ranges claim what CI runs: every lower bound is the version .ci/oldest.txt pins (CI's second
step installs those and runs the import surface, the configs and a small recipe run), every pin lies inside its
range, and .ci/run prints the versions it resolved."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI runs 3.11)

ROOT = Path(__file__).resolve().parents[1]
# only the CPU build torch 2.13.0 installs on this project's machines, and torch pins its own triton
NOT_AT_LOWER_BOUND = {"torch", "triton"}


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["test"] + extras["nf4"]]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_normal(name)] = Version(version)
    return pins


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_lower_bound_is_what_ci_installs():
    pins = _pins()
    for requirement in _requirements():
        name = _normal(requirement.name)
        assert name in pins, f"{name} is a dependency but .ci/oldest.txt does not pin it: rerun its command"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, str(requirement.specifier))
        lower = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        if name not in NOT_AT_LOWER_BOUND:
            assert lower == [pins[name]], (f"{name}: pyproject says {requirement.specifier}, CI's oldest step runs "
                                           f"{pins[name]}: make the lower bound the version that was run")


def test_ci_runs_the_oldest_step_and_prints_the_versions_it_resolved():
    script = (ROOT / ".ci" / "run").read_text()
    assert "-c .ci/oldest.txt" in script
    assert script.count("eora-ft info") >= 2  # after each install: the resolved versions in CI's log
