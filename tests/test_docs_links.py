"""Every relative link in the repository's Markdown pages points at a file that exists.

A link is `[text](target)` or `![alt](target)` outside code; a target with a scheme
(`https:`, `mailto:`) is not followed. A relative target must name an existing file or folder,
relative to the page that holds it; a `#fragment` on a Markdown target (or a bare `#fragment`)
must be the anchor GitHub derives from one of that page's headings. The pages are every `*.md`
below the repository root except the training runs' own folders under `campaign/` (their files
are rewritten by the runs) and tool folders (`.venv`, `.git`, caches, `*.egg-info`).
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_pages(root: pathlib.Path) -> list[pathlib.Path]:
    """The `*.md` files below `root` that the check reads, sorted."""
    pages = []
    for path in sorted(root.rglob("*.md")):
        parts = path.relative_to(root).parts
        if any(part.startswith(".") or part.endswith(".egg-info") for part in parts):
            continue
        if parts[0] == "campaign" and len(parts) > 2:
            continue
        pages.append(path)
    return pages


def _without_code(text: str) -> str:
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a page: lower case, punctuation dropped, spaces
    as hyphens, `-1`, `-2`, ... on repeats."""
    seen = {}
    result = set()
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def broken_links(page: pathlib.Path) -> list[str]:
    """The relative links of `page` that resolve to nothing, as `page: target` lines."""
    problems = []
    for target in _LINK.findall(_without_code(page.read_text())):
        if _SCHEME.match(target):
            continue
        path_part, _, fragment = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            problems.append(f"{page}: {target} (no such file)")
        elif fragment and resolved.suffix == ".md" and resolved.is_file():
            if fragment not in anchors(resolved.read_text()):
                problems.append(f"{page}: {target} (no heading with that anchor)")
    return problems


def test_every_relative_link_in_the_markdown_pages_resolves():
    pages = markdown_pages(ROOT)
    assert ROOT / "README.md" in pages and ROOT / "docs" / "api.md" in pages
    problems = [problem for page in pages for problem in broken_links(page)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_check_finds_missing_files_and_anchors_and_skips_code(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Speed: 1.5 times `faster`\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/page.md) [ok](docs/page.md#speed-15-times-faster) ![ok](docs/)\n"
        "[web](https://example.org/x) [here](#top-heading)\n"
        "[gone](docs/missing.md) [bad anchor](docs/page.md#speed)\n"
        "`[code](not/checked.md)`\n\n```\n[fenced](not/checked.md)\n```\n# Top heading\n"
    )
    (tmp_path / "campaign" / "run").mkdir(parents=True)
    (tmp_path / "campaign" / "run" / "log.md").write_text("[x](missing.md)\n")

    pages = markdown_pages(tmp_path)
    assert pages == [tmp_path / "README.md", tmp_path / "docs" / "page.md"]
    problems = broken_links(tmp_path / "README.md")
    assert [problem.split(": ", 1)[1] for problem in problems] == [
        "docs/missing.md (no such file)",
        "docs/page.md#speed (no heading with that anchor)",
    ]
