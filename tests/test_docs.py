"""The repository documents its method itself, in docs/method.md: no file may point outside the repository
for it, and every "docs/method.md section N" cited in code or documentation must name an existing section."""
import re
import subprocess

import pytest

from tests.conftest import REPO

METHOD_DOC = REPO / "docs" / "method.md"
# Built from pieces so that this file does not contain what it looks for.
FORBIDDEN = {"a path into the parent folder's shared/ directory": re.compile(re.escape(".." + "/shared")),
             "the name of the former external method document": re.compile(r"\b" + "SP" + r"EC\b")}
CITATION = re.compile(r"docs/method\.md\)?,?\s+sections?\s+(\d+(?:(?:\s*,\s*|\s+and\s+|\s+or\s+)\d+)*)")
HEADING = re.compile(r"^## (\d+)\. \S", re.MULTILINE)


def repository_files():
    """Tracked files and untracked ones git does not ignore (so new files are checked before their commit)."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the file list comes from git ls-files")
    paths = sorted({REPO / name for name in listing.decode().split("\0") if name})
    return [path for path in paths if ".git" not in path.relative_to(REPO).parts[:1] and path.is_file()]


def read_text(path):
    """The file's text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_file_refers_to_a_method_document_outside_the_repository():
    problems = []
    for path in repository_files():
        text = read_text(path)
        if text is None:
            continue
        for what, pattern in FORBIDDEN.items():
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not problems, "refer to docs/method.md instead:\n" + "\n".join(problems)


def test_every_cited_section_of_the_method_document_exists():
    assert METHOD_DOC.is_file(), "docs/method.md is missing"
    sections = {int(number) for number in HEADING.findall(METHOD_DOC.read_text())}
    assert sections, "docs/method.md has no numbered section headings (## N. Title)"
    cited, problems = 0, []
    for path in repository_files():
        if path.suffix not in (".py", ".md"):
            continue
        text = read_text(path)
        if text is None:
            continue
        for match in CITATION.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            for number in map(int, re.findall(r"\d+", match.group(1))):
                cited += 1
                if number not in sections:
                    problems.append(f"{path.relative_to(REPO)}:{line}: cites section {number}")
    assert not problems, f"docs/method.md has sections {sorted(sections)} only:\n" + "\n".join(problems)
    assert cited > 0, "no citation of docs/method.md found: is the citation pattern still right?"


def test_the_citation_pattern_reads_every_form_in_use():
    text = ("see docs/method.md section 3; docs/method.md sections 2 and 8;\n"
            "[docs/method.md](docs/method.md) section 9; docs/method.md\nsection 4;\n"
            "docs/method.md sections 5, 6 and 7")
    numbers = [int(n) for match in CITATION.finditer(text) for n in re.findall(r"\d+", match.group(1))]
    assert numbers == [3, 2, 8, 9, 4, 5, 6, 7]
