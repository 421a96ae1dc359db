"""Every number has one home: each result row of README.md links the docs/RESULTS.md section that
holds its full table, and every number of the row, every ``mean +- interval`` pair with its sign,
appears in that section. Links to a section of docs/RESULTS.md from README or docs/ name a heading
that exists, and the README stays short with its first command near the top."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "RESULTS.md"

# a link to a section of the results document: docs/RESULTS.md#anchor (README), RESULTS.md#anchor
LINK = re.compile(r"\]\((?:docs/)?RESULTS\.md#([\w-]+)\)")
# 21,504 / 90.06 / +2.42 / -0.19, not the 128 of GRU-128, the 1 of top-1 or the 2 of x2
_VALUE = r"(?<![\w.,])(?<![A-Za-z_]-)\d+(?:,\d{3})*(?:\.\d+)?(?!\d)"
NUMBER = re.compile(rf"(?:(?<![\w.,)])([+-]))?({_VALUE})")
PAIR = re.compile(rf"((?:(?<![\w.,)])[+-])?{_VALUE})%?\s*±\s*({_VALUE})")


def _plain(text: str) -> str:
    """Text with "+-" written as one symbol, link targets dropped and whitespace collapsed."""
    text = text.replace("+-", "±")
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.sub(r"\s+", " ", text)


def numbers(text: str) -> set[str]:
    """The numbers of ``text`` as written, signed where a sign stands before them."""
    return {sign + value for sign, value in NUMBER.findall(_plain(text))}


def pairs(text: str) -> set[str]:
    """Each ``mean +- half width`` of ``text``, as ``mean ± width`` with the mean's sign."""
    return {f"{mean} ± {width}" for mean, width in PAIR.findall(_plain(text))}


def anchor(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading (GitHub's rule, ASCII headings)."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def sections(markdown: str) -> dict[str, str]:
    """Anchor -> text of every section (a heading down to the next heading of its level or
    above, so a section holds its subsections)."""
    lines = markdown.splitlines()
    heads = [
        (i, len(m.group(1)), m.group(2))
        for i, line in enumerate(lines)
        if (m := re.match(r"(#{1,6}) (.+)", line))
    ]
    out = {}
    for k, (i, level, title) in enumerate(heads):
        end = next((j for j, lvl, _ in heads[k + 1 :] if lvl <= level), len(lines))
        out[anchor(title)] = "\n".join(lines[i:end])
    return out


def result_rows(readme: str) -> list[str]:
    """The table rows of the README's "## Results" section (header and rule left out)."""
    part = readme.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in part.splitlines() if line.startswith("|")]
    return [row for row in table[1:] if not re.fullmatch(r"[|\s:-]+", row)]


def check(readme: str, results: str) -> list[str]:
    """Every disagreement between the README's result rows and the results document."""
    found = sections(results)
    problems = []
    for row in result_rows(readme):
        cited = LINK.findall(row)
        if not cited:
            problems.append(f"cites no section of docs/RESULTS.md: {row}")
            continue
        missing = [a for a in cited if a not in found]
        if missing:
            problems.append(f"no section #{', #'.join(missing)} in docs/RESULTS.md: {row}")
            continue
        home = "\n".join(found[a] for a in cited)
        signed, plain = numbers(home), {n.lstrip("+-") for n in numbers(home)}
        for n in sorted(numbers(row)):
            if n not in (signed if n[0] in "+-" else plain):
                problems.append(f"{n} is not in #{', #'.join(cited)}: {row}")
        for p in sorted(pairs(row) - pairs(home)):
            problems.append(f"{p} is not in #{', #'.join(cited)}: {row}")
    return problems


def test_readme_results_agree_with_the_results_document():
    readme = README.read_text()
    rows = result_rows(readme)
    assert 6 <= len(rows) <= 8, f"the README's summary has {len(rows)} result rows"
    assert all("+-" in row for row in rows), "every result row gives its 95% interval"
    assert check(readme, RESULTS.read_text()) == []


def test_the_check_catches_a_number_that_moved():
    readme, results = README.read_text(), RESULTS.read_text()
    assert "90.06 +- 1.18" in readme and "+2.42 +- 1.33" in readme
    # a changed mean, a flipped sign, a changed interval: each is named
    for old, new in [
        ("90.06 +- 1.18", "90.60 +- 1.18"),
        ("+2.42 +- 1.33", "-2.42 +- 1.33"),
        ("+2.42 +- 1.33", "+2.42 +- 1.03"),
    ]:
        problems = check(readme.replace(old, new), results)
        mean = new.split(" +- ")[0]
        assert problems and all(mean in p for p in problems), problems
    # a pair whose two numbers both appear in the section, but not together
    assert check(readme.replace("90.06 +- 1.18", "90.06 +- 0.32"), results)
    # a row without a link, and a link to a section that does not exist
    row = next(r for r in result_rows(readme) if "90.06" in r)
    unlinked = row.replace("docs/RESULTS.md#default-commands", "docs/RESULTS.md")
    assert "cites no section" in check(readme.replace(row, unlinked), results)[0]
    renamed = row.replace("#default-commands", "#defaults")
    assert "no section #defaults" in check(readme.replace(row, renamed), results)[0]
    # a number cited from the wrong section (it lives in the LSTM section only)
    moved = row.replace("90.06 +- 1.18", "87.75 +- 0.94")
    problems = check(readme.replace(row, moved), results)
    assert problems and all("87.75" in p or "0.94" in p for p in problems), problems


def test_number_and_anchor_rules():
    assert numbers("GRU-128, top-1, x2: 21,504-23,968 at +2.42 +- 1.33 and -0.19") == {
        "21,504",
        "23,968",
        "+2.42",
        "1.33",
        "-0.19",
    }
    assert pairs("paired +0.81 +- 1.26 at 5,000, 90.06 +- 1.18%") == {
        "+0.81 ± 1.26",
        "90.06 ± 1.18",
    }
    assert anchor("Speech frontier: two layers and the LSTM") == (
        "speech-frontier-two-layers-and-the-lstm"
    )
    assert anchor("Paper numbers (not run here)") == "paper-numbers-not-run-here"


def test_every_link_to_a_results_section_exists():
    found = sections(RESULTS.read_text())
    paths = [README, *sorted((ROOT / "docs").glob("*.md"))]
    missing = [
        f"{path.relative_to(ROOT)}: #{a}"
        for path in paths
        for a in LINK.findall(path.read_text())
        if a not in found
    ]
    assert not missing, "\n".join(missing)


def test_readme_is_short_and_starts_with_usage():
    lines = README.read_text().splitlines()
    assert len(lines) <= 130
    first_command = next(i for i, line in enumerate(lines) if line.startswith("```bash"))
    assert first_command < 30
    results = next(i for i, line in enumerate(lines) if line == "## Results")
    assert first_command < results
