"""Print every floor pyproject.toml declares (`name>=X`) as a pin (`name==X`), for the base
install and the extras named on the command line: `.ci/floors` installs exactly these.
Python 3.11 or later (tomllib), as `.ci/floors` runs on."""

import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def floor_pins(extras: list[str]) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    declared = list(project["dependencies"])
    for extra in extras:
        declared += project["optional-dependencies"][extra]
    pins = set()
    for line in declared:
        requirement = Requirement(line)
        for spec in requirement.specifier:
            if spec.operator == ">=":
                pins.add(f"{requirement.name}=={spec.version}")
    return sorted(pins)


if __name__ == "__main__":
    print("\n".join(floor_pins(sys.argv[1:])))
