"""Check paper_tables/slide_lines.yaml against the slides themselves, where a copy of them is at hand.

The repository keeps the slide lines that hold the reference numbers (tests/test_reference_numbers.py checks
every number against them, in any clone); the slides are not part of the repository, so this comparison is a
maintainer's check rather than a test:

    python paper_tables/check_slide_lines.py path/to/seed-rrhf-slides.txt
"""

import sys
from pathlib import Path

import yaml


def main(slides: Path) -> int:
    kept = yaml.safe_load((Path(__file__).parent / "slide_lines.yaml").read_text(encoding="utf-8"))
    original = slides.read_text(encoding="utf-8").split("\n")
    wrong = [number for number, text in kept.items() if number > len(original) or original[number - 1] != text]
    for number in wrong:
        found = original[number - 1] if number <= len(original) else None
        print(f"line {number}: kept {kept[number]!r}, slides {found!r}")
    print(f"{len(kept) - len(wrong)} of {len(kept)} kept lines match {slides}")
    return 1 if wrong else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
