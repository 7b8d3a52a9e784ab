"""No package index or mirror host is written in the repository.

Where pip, apt, debootstrap or the Docker build fetch packages from is the machine's own
configuration (pip.conf, PIP_* variables, apt sources) or a build argument without a default.
Links to papers, data sets and project pages are fine; what fails is a host that serves
packages (pip indexes and wheel hosts, Debian/Ubuntu archives and their mirrors, conda channels,
container registries), or any URL written where an index or mirror goes (``index-url``,
``--find-links``, ``TORCH_INDEX=``, an apt ``deb``/``URIs:`` line, a ``.../simple`` path).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()

# Hosts that serve packages, as regular expressions on the host name.
INDEX_HOSTS = [
    r"(test\.)?pypi\.(org|python\.org)",
    r"files\.pythonhosted\.org",
    r"download\.pytorch\.org",
    r"pypi\.(ngc\.)?nvidia\.com",
    r"developer\.download\.nvidia\.com",
    r"(deb|security|snapshot|ftp|ftp\.[a-z]{2}|cdn-fastly\.deb)\.debian\.org",
    r"([a-z]{2}\.)?(archive|security|ports)\.ubuntu\.com",
    r"(conda\.)?anaconda\.(org|com)",
    r"repo\.anaconda\.com",
    r"download\.docker\.com",
    r"registry-1\.docker\.io",
    r"(ghcr|quay|nvcr|gcr)\.io",
    # Any host named for what it does: mirrors.example.edu, pypi.corp.example, a devpi.
    r"([\w-]+\.)*(mirrors?|pypi|devpi|artifactory|nexus)[\w-]*(\.[\w-]+)+",
]
HOST = re.compile(r"(?<![\w.-])(" + "|".join(INDEX_HOSTS) + r")(?![\w-])", re.I)
URL = r"[a-z][a-z0-9+.-]*://\S+"
# A URL where an index or mirror goes, whatever its host.
INDEX_PLACES = [
    rf"(index[-_]url|find[-_]links|trusted[-_]host|TORCH_INDEX|DEBIAN_MIRROR)\W{{0,3}}=?\s*{URL}",
    rf"--(extra-)?index-url[= ]\S*{URL}",
    rf"^\s*(deb|deb-src)\s+(\[[^\]]*\]\s+)?{URL}",
    rf"^\s*URIs:\s*{URL}",
    rf"debootstrap\b.*\s{URL}",
    r"[a-z][a-z0-9+.-]*://[^\s\"'`)]*/(simple|whl)(/|\b)",
]
PLACE = re.compile("|".join(f"(?:{p})" for p in INDEX_PLACES), re.I | re.M)


def offences(text: str) -> list[str]:
    """The lines of ``text`` that name an index or mirror host, or put a URL where one goes."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        hit = HOST.search(line) or PLACE.search(line)
        if hit:
            found.append(f"{number}: {hit.group(0)}")
    return found


def tracked_files() -> list[Path]:
    """The repository's files (tracked or not yet added, not ignored); without git, the tree."""
    proc = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode == 0 and proc.stdout:
        paths = [ROOT / name for name in proc.stdout.split("\0") if name]
    else:
        skip = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
        paths = [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)]
    return [p for p in paths if p.is_file()]


def test_no_tracked_file_names_an_index_or_mirror_host() -> None:
    files = [p for p in tracked_files() if p.resolve() != THIS]
    assert any(p.name == "Dockerfile" for p in files), "the scan must see the Dockerfile"
    bad = []
    for path in files:
        data = path.read_bytes()
        if b"\0" in data:  # binary
            continue
        bad += [
            f"{path.relative_to(ROOT)}:{hit}" for hit in offences(data.decode(errors="replace"))
        ]
    assert not bad, (
        "package-index or mirror hosts written in the repository (take them from pip's and apt's "
        "configuration, or a build argument without a default):\n" + "\n".join(bad)
    )


@pytest.mark.parametrize(
    "line",
    [
        "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu",
        "pip install --extra-index-url https://wheels.example.com/whl/cu130 torch",
        "pip install --index-url=https://packages.example.com/simple torch",
        "PIP_INDEX_URL=https://packages.example.com/repo",
        "index-url = https://packages.example.com/repo",
        "MIRROR=${DISTGROW_DEBIAN_MIRROR:-http://deb.debian.org/debian}",
        "deb [arch=amd64] http://archive.example.net/debian bookworm main",
        "URIs: http://archive.example.net/debian",
        "debootstrap bookworm /tmp/root http://archive.example.net/debian",
        "see pypi.org for the wheel",
        "mirrors.example.edu.cn/pypi",
        "conda install -c https://conda.anaconda.org/pytorch torch",
        "FROM ghcr.io/example/base:1",
    ],
)
def test_an_index_or_mirror_is_caught(line: str) -> None:
    hits = offences(f"some text\n{line}\nmore text\n")
    assert len(hits) == 1 and hits[0].startswith("2: "), hits


@pytest.mark.parametrize(
    "line",
    [
        "Goyal et al., https://arxiv.org/abs/1706.02677",
        "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "Debian's docker.io with its own data root and socket",
        "it builds Horovod from the PyPI sdist",
        "ARG TORCH_INDEX",
        "--build-arg TORCH_INDEX=<your cu130 torch index>",
        "MIRROR=${DISTGROW_DEBIAN_MIRROR:-}",
        "A mirrored digit is not the same digit",
    ],
)
def test_a_link_that_is_no_index_passes(line: str) -> None:
    assert offences(line) == []
