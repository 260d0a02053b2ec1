"""Documentation stays true: README code runs, and the package map names every module."""

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = _python_blocks((ROOT / "README.md").read_text())
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)  # examples write files (save_pretrained)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_architecture_package_map_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "src" / "rxt"
    modules = sorted(p.relative_to(package) for p in package.rglob("*.py"))
    missing = [str(m) for m in modules if m.name not in text]
    assert not missing, f"docs/architecture.md does not mention: {missing}"


@pytest.mark.parametrize("name", ["make demo", "make test"])
def test_readme_names_the_two_setup_commands(name):
    assert name in (ROOT / "README.md").read_text()


def test_all_extra_installs_every_user_extra():
    """``pip install ".[all]"`` is documented as everything a user runs: it must name every
    extra except the test suite's, so a new extra cannot be forgotten there."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (spec,) = extras["all"]
    named = set(re.fullmatch(r"rxt\[(.*)\]", spec).group(1).split(","))
    assert named == set(extras) - {"all", "test"}
    assert 'pip install -e ".[all]"' in (ROOT / "README.md").read_text()
