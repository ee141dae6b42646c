"""The documentation points only inside the repository, and its links resolve.

The design contract once lived outside the repository (a sibling folder), and every pointer to
it was dead for anyone with a clone; now it is docs/design.md."""

import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE = "../" + "shared"  # spelt in two parts so that this file does not match itself
DOCS = ["README.md", "bench/README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _tracked_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in out.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


def _anchors(path):
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces to -."""
    with open(path, encoding="utf-8") as fh:
        headings = [line.lstrip("#").strip() for line in fh if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_no_tracked_file_points_outside_the_repository():
    offenders = []
    for name in _tracked_files():
        with open(os.path.join(ROOT, name), encoding="utf-8", errors="ignore") as fh:
            for number, line in enumerate(fh, 1):
                if OUTSIDE in line:
                    offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_design_contract_is_in_the_repository():
    assert "docs/design.md" in DOCS


@pytest.mark.parametrize("doc", DOCS)
def test_relative_markdown_links_resolve(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as fh:
        targets = LINK.findall(fh.read())
    broken = []
    for target in targets:
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else os.path.join(ROOT, doc)
        if not os.path.exists(resolved):
            broken.append(f"{target}: no such file")
        elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{doc}: " + "; ".join(broken)
