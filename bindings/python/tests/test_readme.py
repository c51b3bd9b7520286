"""The Python examples of docs/python.md ("Use the policies from PyTorch",
once the README's section) run as written."""

from __future__ import annotations

import re

import pytest

from conftest import REPO


def examples() -> list:
    text = (REPO / "docs" / "python.md").read_text()
    section = text.split("## Use the policies from PyTorch", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_the_three_examples():
    blocks = examples()
    assert len(blocks) == 3
    assert "FreezeController" in blocks[0]
    assert "simfreeze.lightning" in blocks[1] and "simfreeze.hf" in blocks[2]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["loop", "lightning", "hf"])
def test_readme_example_runs(tmp_path, monkeypatch, capsys, index):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(examples()[index], f"README example {index + 1}", "exec"), namespace)
    if index == 0:
        # The loop example prints the freeze steps: SLF froze every block.
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert "None" not in line and line.startswith("[")
