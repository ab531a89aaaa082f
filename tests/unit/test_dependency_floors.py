"""pyproject.toml keeps versions with known vulnerabilities out."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"
KNOWN_BAD = {
    "starlette": "0.49.0",  # Range header DoS, fixed in 0.49.1
    "h11": "0.15.0",  # chunked-body request smuggling, fixed in 0.16.0
    "jinja2": "3.1.5",  # sandbox escape through |attr, fixed in 3.1.6
    "python-multipart": "0.0.17",  # boundary DoS, fixed in 0.0.18
}


def requirements() -> dict[str, Requirement]:
    data = tomllib.loads(PYPROJECT.read_text())
    parsed = (Requirement(line) for line in data["project"]["dependencies"])
    return {r.name.lower(): r for r in parsed}


@pytest.mark.parametrize(("name", "bad"), KNOWN_BAD.items())
def test_known_bad_versions_are_refused(name: str, bad: str) -> None:
    requirement = requirements()[name]
    assert not requirement.specifier.contains(Version(bad)), f"{requirement} admits {name} {bad}"
