"""The interpreter runs the versions constraints.txt pins, and the pins satisfy pyproject.toml's ranges.

constraints.txt is what `make setup` installs through (and `make lock` writes); a drifted package shows here by name
with the installed and the pinned version. Only packages absent from this interpreter are skipped, and of those only
ones the project does not require directly.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.environment import PACKAGES

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"


def _pins() -> dict[str, Requirement]:
    """constraints.txt as {canonical name: requirement}; every line an exact `name==version` pin, no name twice."""
    pins: dict[str, Requirement] = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert (len(specs) == 1 and specs[0].operator == "==" and not req.extras and req.url is None
                and req.marker is None), f"constraints.txt:{number}: {line!r} is not an exact pin name==version"
        name = canonicalize_name(req.name)
        assert name not in pins, f"constraints.txt:{number}: {req.name} is pinned twice"
        pins[name] = req
    return pins


def _direct() -> list[Requirement]:
    """pyproject.toml's dependencies and its dev extra: what `make setup` installs by name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


PINS = _pins()
DIRECT = {canonicalize_name(r.name) for r in _direct()}


def _pinned(name: str) -> str:
    return str(next(iter(PINS[name].specifier)).version)


def test_lock_pins_packages_not_the_project_or_installers():
    assert len(PINS) > len(DIRECT)
    assert not {"overopt", "pip", "setuptools", "wheel"} & PINS.keys()


@pytest.mark.parametrize("name", sorted(PINS))
def test_installed_version_is_pinned(name):
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        assert name not in DIRECT, f"{name}: not installed, constraints.txt pins {_pinned(name)} (a direct dependency)"
        pytest.skip(f"{name}: not installed in this interpreter")
    if PINS[name].specifier.contains(installed, prereleases=True):
        return
    message = f"{name}: installed {installed}, constraints.txt pins {_pinned(name)}"
    if name == "torch":
        import torch

        # `make setup` keeps a torch that already imports, meant for a GPU user's own build; that one is skipped here
        # if it is in pyproject's range. A CPU build off the pin is a stale .venv: reinstall torch through the lock.
        (spec,) = (r for r in _direct() if canonicalize_name(r.name) == "torch")
        assert spec.specifier.contains(installed, prereleases=True), f"{message}, outside pyproject's {spec}"
        if torch.version.cuda or torch.version.hip:
            pytest.skip(f"{message}: a GPU build, kept by make setup as the user's own torch")
        message += f" (pip install -c constraints.txt torch=={_pinned(name)})"
    pytest.fail(message)


def test_direct_dependencies_are_pinned_within_range():
    problems = []
    for req in _direct():
        name = canonicalize_name(req.name)
        if name not in PINS:
            problems.append(f"{req.name}: required by pyproject.toml ({req}) but not pinned in constraints.txt")
        elif not req.specifier.contains(_pinned(name), prereleases=True):
            problems.append(f"{req.name}: constraints.txt pins {_pinned(name)}, outside pyproject.toml's {req}")
    assert not problems, "\n".join(problems)


def test_report_footer_packages_are_pinned():
    """Every package a report's footer names (pipeline.environment.PACKAGES) is pinned under that name. Footers print
    importlib.metadata's version, local label included (torch 2.13.0+cpu); the pin (torch==2.13.0) admits it, which
    test_installed_version_is_pinned checks."""
    missing = [p for p in PACKAGES if canonicalize_name(p) not in PINS]
    assert not missing, f"printed in report footers but not pinned in constraints.txt: {', '.join(missing)}"
