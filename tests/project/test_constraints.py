"""constraints.txt (the versions of the last green run, README) pins every package that README command 2 installs,
each pin inside pyproject.toml's range, so `pip install -e '.[dev,deepspeed,eval]' -c constraints.txt` resolves."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

from support.runs import REPO


def test_constraints_pin_every_dependency_of_command_2_inside_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in ("dev", "deepspeed", "eval"):
        requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = Version(version)
    assert len(pins) > 50
    for requirement in requirements:
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {requirement.name}=={pins[name]}, outside pyproject's {requirement}"
