"""The conda environment files install the same dependency versions as pyproject.toml."""

import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))


def requirements(lines):
    """Canonical package name -> version specifier (e.g. 'torch' -> '==2.14.1')."""
    parsed = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): str(r.specifier) for r in parsed}


def pyproject_requirements():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return requirements(project["dependencies"])


def pip_section(env_file):
    """The `pip:` list of a conda environment file."""
    dependencies = yaml.safe_load(env_file.read_text())["dependencies"]
    sections = [d["pip"] for d in dependencies if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, f"{env_file.name}: expected one pip section"
    return requirements(sections[0])


def test_env_files_exist():
    assert ENV_FILES, "no conda environment file in envs/"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_pins_match_pyproject(env_file):
    wanted, env = pyproject_requirements(), pip_section(env_file)
    pinned = {name: spec for name, spec in wanted.items() if spec.startswith("==")}
    assert pinned, "pyproject.toml pins nothing: the check would be empty"
    drifted = {name: (spec, env.get(name)) for name, spec in pinned.items() if env.get(name) != spec}
    assert not drifted, f"{env_file.name}: (pyproject, env) versions differ: {drifted}"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_same_package_set_and_python(env_file):
    wanted, env = pyproject_requirements(), pip_section(env_file)
    assert set(env) == set(wanted), f"{env_file.name}: missing {set(wanted) - set(env)}, extra {set(env) - set(wanted)}"
    assert {n: s for n, s in env.items() if s != wanted[n]} == {}, f"{env_file.name}: specifiers differ"
    conda = yaml.safe_load(env_file.read_text())["dependencies"]
    assert "python=3.11" in conda and "pip" in conda


def test_requirements_detect_drift():
    """The comparison is not vacuous: a changed pin is seen."""
    assert requirements(["torch==2.14.1"]) != requirements(["torch==2.13.0"])
    assert requirements(["POT==0.9.7"]) == requirements(["pot == 0.9.7"])


def test_the_cuda_build_the_env_file_names_is_the_installed_one():
    """The env file's comment names the CUDA major version of the torch wheel that pip installs."""
    import re

    torch = pytest.importorskip("torch")
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch is installed: nothing to compare")
    for env_file in ENV_FILES:
        stated = re.findall(r"CUDA (\d+) build", env_file.read_text())
        assert stated == [torch.version.cuda.split(".")[0]], (
            f"{env_file.name}: says CUDA {stated}, torch {torch.version.cuda}"
        )
