"""The README's measured numbers are the files under docs/results/, never typed by hand."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("sync_readme", ROOT / "scripts" / "sync_readme.py")
sync_readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sync_readme)


def test_every_results_block_equals_its_file():
    assert sync_readme.problems() == []


def test_the_check_catches_a_block_that_drifted(tmp_path):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "x.md").write_text("| a | 1.00 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results: docs/results/x.md -->\n| a | 1.00 |\n<!-- /results -->\n")
    assert sync_readme.problems(readme, tmp_path) == []
    readme.write_text("intro\n<!-- results: docs/results/x.md -->\n| a | 0.99 |\n<!-- /results -->\n")
    assert "differs" in sync_readme.problems(readme, tmp_path)[0]
    readme.write_text("<!-- results: docs/results/gone.md -->\n<!-- /results -->\n")
    assert "no such file" in sync_readme.problems(readme, tmp_path)[0]
    readme.write_text("intro\n<!-- results: docs/results/x.md -->\nold\n<!-- /results -->\n")
    assert "| a | 1.00 |" in sync_readme.render(readme.read_text(), tmp_path)


def test_every_image_the_readme_shows_exists():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    missing = [p for p in images if not (ROOT / p).is_file()]
    assert not missing, missing
