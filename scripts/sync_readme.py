"""Keep the README's numbers equal to the files under docs/results/.

Every table or line of measured numbers in README.md sits between two markers that name its file:

    <!-- results: docs/results/bn_speed.md -->
    ...exactly the file's contents...
    <!-- /results -->

The file is written by the command that measured it (each file says which, in its first line);
this script copies each file into its block (``python scripts/sync_readme.py``, or ``make readme``),
and ``--check`` (run by tests/test_readme_results.py) fails when a block differs from its file or
names a file that does not exist.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- results: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.DOTALL)


def blocks(text: str) -> list[tuple[str, str]]:
    """(path, body) of every results block in ``text``."""
    return [(m["path"], m["body"]) for m in BLOCK.finditer(text)]


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every results block replaced by its file's contents."""

    def fill(m: re.Match) -> str:
        body = (root / m["path"]).read_text(encoding="utf-8")
        if not body.endswith("\n"):
            body += "\n"
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(fill, text)


def problems(readme: Path = ROOT / "README.md", root: Path = ROOT) -> list[str]:
    """What differs between the README's blocks and their files (empty when they agree)."""
    text = readme.read_text(encoding="utf-8")
    out = []
    for path, body in blocks(text):
        file = root / path
        if not path.startswith("docs/results/"):
            out.append(f"{path}: a results block must name a file under docs/results/")
        elif not file.is_file():
            out.append(f"{path}: named by a results block in {readme.name}, but there is no such file")
        else:
            want = file.read_text(encoding="utf-8")
            if body.rstrip("\n") != want.rstrip("\n"):
                out.append(f"{path}: the README's block differs from the file; run `make readme`")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report differences (exit 1 if any)")
    args = parser.parse_args(argv)
    readme = ROOT / "README.md"
    if args.check:
        found = problems(readme)
        for line in found:
            print(line)
        return 1 if found else 0
    missing = [p for p, _ in blocks(readme.read_text(encoding="utf-8")) if not (ROOT / p).is_file()]
    if missing:
        print(f"missing results files: {', '.join(missing)}", file=sys.stderr)
        return 2
    readme.write_text(render(readme.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
