"""The product's face: the README's shape, the changelog's version, the links between the pages."""

import re
from pathlib import Path

import switchnorm
from benchmarks import results

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_opens_with_the_two_fresh_machine_commands_and_stays_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    code = lines.index("```")
    assert lines[code + 1].startswith("make demo") and lines[code + 2].startswith("make test")
    assert len(lines) <= 120, len(lines)
    assert results.BEGIN in lines and results.END in lines


def test_the_changelog_has_an_entry_for_the_package_version():
    assert f"## {switchnorm.__version__}" in (ROOT / "CHANGELOG.md").read_text().splitlines()


def test_every_relative_link_of_the_pages_names_a_file_that_exists():
    missing = []
    for page in PAGES:
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in link and not (page.parent / link).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {link}")
    assert not missing


def test_the_readme_python_snippets_run_in_order():
    """The README's ```python blocks, run one after another in one namespace, as a reader pastes them."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2, "the README should show the drop-in and the weights snippets"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
