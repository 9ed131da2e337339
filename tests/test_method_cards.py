"""Every registered method has a card in docs/methods/<name>.md with the same sections, listed in the
index, and every method spec a card shows parses."""
import re
from pathlib import Path

import pytest

from maxup import methods as M
from maxup.cli import _methods_arg

CARDS = Path(__file__).resolve().parents[1] / "docs" / "methods"
SECTIONS = ["## Formula", "## Reference", "## Hyper-parameters", "## Cost per step", None, "## When it hurts", "## Use"]
RESULTS = ("## Results", "## Results")
NAMES = [e.name for e in M.list_methods()]


def card(name: str) -> str:
    path = CARDS / f"{name}.md"
    assert path.is_file(), f"no method card {path.name} for the registered method {name!r}"
    return path.read_text()


@pytest.mark.parametrize("name", NAMES)
def test_card_has_every_section_in_order(name):
    text = card(name)
    assert text.startswith(f"# {name}: "), "a card starts with '# <name>: <full name>'"
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    expected = [RESULTS[0] if h is None and RESULTS[0] in headings else RESULTS[1] if h is None else h
                for h in SECTIONS]
    assert headings == expected
    assert "{{" not in text and "<!--" not in text, "unfilled placeholder"
    assert re.search(r"\d\.\d+x", text.split("## Cost per step")[1]), "the cost section gives a measured ratio"


@pytest.mark.parametrize("name", NAMES)
def test_specs_in_card_parse(name):
    text = card(name)
    specs = re.findall(r'--methods? "([^"]+)"', text) + re.findall(r'maxup\.fit\([^,]+, "([^"]+)"', text)
    assert any(name in s for s in specs), "the Use section shows the method in a command"
    for group in specs:
        for spec in _methods_arg(group):
            M.parse(spec)


def test_index_lists_every_card():
    index = (CARDS / "README.md").read_text()
    linked = set(re.findall(r"\]\((\w+)\.md\)", index))
    assert linked == set(NAMES)
    assert {p.stem for p in CARDS.glob("*.md")} - {"README"} == set(NAMES)


@pytest.mark.parametrize("name", NAMES + ["README"])
def test_table_rows_have_as_many_cells_as_their_header(name):
    """A '|' inside a cell (``|w|``, ``||g||``) must be escaped, or the row gains cells."""
    columns, fenced = None, False
    for line in (CARDS / f"{name}.md").read_text().splitlines():
        fenced ^= line.startswith("```")
        if fenced or not line.startswith("|"):
            columns = None
            continue
        cells = len(re.split(r"(?<!\\)\|", line)) - 2
        columns = columns or cells
        assert cells == columns, line


def test_cards_show_the_committed_results():
    """The results sections are written from docs/results/*/results.json by scripts/card_results.py."""
    import subprocess
    import sys

    script = CARDS.parents[1] / "scripts" / "card_results.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
