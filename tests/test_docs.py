"""Documentation stays true: README code runs, and the package map names every module."""

import re
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
