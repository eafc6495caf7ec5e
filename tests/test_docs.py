"""The README stays short, and every relative link in it and in docs/ points to a file that exists."""

import glob
import os
import re

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_LIMIT_BYTES = 16_000
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def documents():
    return [os.path.join(PROJECT_DIR, "README.md"), *sorted(glob.glob(os.path.join(PROJECT_DIR, "docs", "*.md")))]


def relative_links(path):
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold commands, not links
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


def test_readme_is_at_most_16000_bytes():
    size = os.path.getsize(os.path.join(PROJECT_DIR, "README.md"))
    assert size <= README_LIMIT_BYTES, f"README.md is {size:,} bytes; move details to docs/"


def test_every_relative_link_points_to_an_existing_file():
    checked, broken = 0, []
    for document in documents():
        for target in relative_links(document):
            path = target.split("#", 1)[0]
            if not path:  # a link within the same page
                continue
            checked += 1
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(document), path))):
                broken.append(f"{os.path.relpath(document, PROJECT_DIR)}: {target}")
    assert not broken, broken
    assert checked >= 10  # the README links to every page of docs/


def test_the_readme_links_every_page_of_docs():
    linked = {os.path.normpath(target.split("#", 1)[0]) for target in relative_links(os.path.join(PROJECT_DIR, "README.md"))}
    pages = {os.path.relpath(path, PROJECT_DIR) for path in documents()[1:]}
    assert pages - linked == set()


def test_the_links_found_are_the_markdown_links():
    assert LINK.findall("see [a](docs/a.md#x), ![b](b.png) and [c](https://example.org)") == [
        "docs/a.md#x", "b.png", "https://example.org"]
