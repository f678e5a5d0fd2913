"""The documentation holds together: the repository cites nothing outside itself, every relative link
in README.md and docs/ lands on a file (and heading) that exists, and the README stays a front page.

Users get the repository and nothing else, so a path into the machine it was written on (or a
sibling checkout) is a dead end for them; what they need from outside material belongs in docs/.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from agent_devkit import REPO

# Spelled in pieces so that this file does not name them itself.
OUTSIDE_PATHS = ("/" + "work/", ".." + "/shared/")
# "<area> engineer": the names of team roles, which mean nothing to a reader of the project.
ROLE_NAME = re.compile(r"\b(?:trust|policy|fleet|sync|storage|runtime|messaging|control|daemon|docs?|config|"
                       r"platform|release|wasm|packaging|devkit|structure|test)\s+engineers?\b", re.I)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")


def _tracked_text_files() -> list[tuple[str, str]]:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout ({exc}): tracked files unknown")
    files: list[tuple[str, str]] = []
    for name in filter(None, out.decode().split("\0")):
        path = REPO / name
        if not path.is_file():
            continue  # deleted in the work tree, not yet committed
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        try:
            files.append((name, data.decode("utf-8")))
        except UnicodeDecodeError:
            continue  # binary
    return files


def test_no_tracked_file_names_a_path_outside_the_repository() -> None:
    files = _tracked_text_files()
    assert len(files) > 50
    hits = [f"{name}:{text.count(chr(10), 0, text.index(p)) + 1}: {p}"
            for name, text in files for p in OUTSIDE_PATHS if p in text]
    assert not hits, "tracked files cite paths outside the repository (write the content into docs/):\n" + \
        "\n".join(hits)


def test_no_tracked_file_names_a_team_role() -> None:
    hits = [f"{name}: {m.group(0)!r}" for name, text in _tracked_text_files() for m in ROLE_NAME.finditer(text)]
    assert not hits, "\n".join(hits)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    result: set[str] = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", markdown), re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def links(markdown: str) -> list[str]:
    prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", markdown))
    return LINK.findall(prose)


def test_slugs_follow_the_rules_of_the_rendered_pages() -> None:
    assert _slug("Status: `edge-agent status`") == "status-edge-agent-status"
    assert _slug("The predicate `urn:edge-agent:release:v1`") == "the-predicate-urnedge-agentreleasev1"
    assert _slug("Health windows survive restarts (crash-loop rollback)") == \
        "health-windows-survive-restarts-crash-loop-rollback"
    assert anchors("# A\n```sh\n# not a heading\n```\n## A\n") == {"a", "a-1"}
    assert links("[x](a.md) `[y](b.md)` ![i](c.png)\n```\n[z](d.md)\n```\n") == ["a.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc: Path) -> None:
    broken: list[str] = []
    for target in links(doc.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # http:, https:, mailto:, file: …
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif not dest.is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text())):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)}:\n" + "\n".join(broken)


REPO_PATH = re.compile(r"(?<![\w/.-])((?:agent|agent_devkit|scripts|tests|configs|examples|systemd|docs)/"
                       r"(?:[\w./*<>-]|\{[^}\s]*\})*)")


def _expand(path: str) -> list[str]:
    """``a/{b,c}.wasm`` → ``a/b.wasm``, ``a/c.wasm`` (a brace without a comma is a placeholder)."""
    m = re.search(r"\{([^}]*,[^}]*)\}", path)
    if m is None:
        return [path]
    return [p for alt in m.group(1).split(",") for p in _expand(path[:m.start()] + alt + path[m.end():])]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_path_the_docs_name_exists(doc: Path) -> None:
    """Files move (scripts/bench/, agent/wasm/ …): a path in the docs must move with them.
    ``{kind}``/``<name>`` placeholders and ``*`` globs must match at least one file."""
    missing = []
    for found in REPO_PATH.findall(doc.read_text()):
        for path in _expand(found.rstrip(".,")):
            pattern = re.sub(r"\{[^}]*\}|<[^>]*>", "*", path)
            if not (list(REPO.glob(pattern)) if "*" in pattern else (REPO / path).exists()):
                missing.append(path)
    assert not missing, f"{doc.relative_to(REPO)} names paths that do not exist: {missing}"


def test_the_readme_is_a_front_page() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200, "the README is a front page: move manual text into docs/"
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert f"\n{command} " in readme, f"the README lost the set-up command {command!r}"
    for doc in DOCS[1:]:
        assert f"(docs/{doc.name}" in readme, f"the README does not link {doc.name}"


def test_the_readme_states_the_documented_exposure_score() -> None:
    documented = re.search(r"exposure score at \*\*([0-9]+\.[0-9])\*\*", (REPO / "docs" / "operating.md").read_text())
    stated = re.search(r"exposure score of ([0-9]+\.[0-9])", (REPO / "README.md").read_text())
    assert documented and stated and stated.group(1) == documented.group(1)
