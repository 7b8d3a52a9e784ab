"""No package index or mirror host is written in the repository.

Where pip, apt, debootstrap or the Docker build fetch packages from is the machine's own
configuration (pip.conf, PIP_* variables, apt sources) or a build argument without a default.
Links to papers, data sets and project pages are fine; what fails is a host that serves
packages (pip indexes and wheel hosts, Debian/Ubuntu archives and their mirrors, conda channels,
container registries), or any URL written where an index or mirror goes (``index-url``,
``--find-links``, ``TORCH_INDEX=``, an apt ``deb``/``URIs:`` line, a ``.../simple`` path).

This file names no such host either: every host-like word of a file is looked up by its
SHA-256 digest (:data:`INDEX_HOST_DIGESTS`), and hosts named for what they do (a mirror, a
devpi) are caught by a generic pattern. To add a host, append
``hashlib.sha256(b"host.name").hexdigest()``: the host and every name under it are caught, and
a two-letter label (a country mirror) is written ``??``.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Collection
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()

# SHA-256 of the hosts that serve packages (pip indexes and wheel hosts, the Debian and Ubuntu
# archives, conda channels, container registries); a host matches when it, or a domain above
# it, is listed.
INDEX_HOST_DIGESTS = frozenset(
    {
        "0206ab7f1f15f8fbafa80e65481da73e5788f90bee7300e183b1ee96b61cc2fa",
        "03e390c8d8a6f2cf7bd2459306b376972ea6d6d28453d4a52dcd6c6c06fc9091",
        "03eabd6c5c4ff24dcf640c4a5ab812c13b01334ff66f5ff111f66b1ee90c266e",
        "0bf8a811d2e271e8d6036ddb7a1ef5261331e2bbab3f94c23d45aa29910cc45b",
        "0fd460f0568e29c129d5164443c22dc23e1fa5ade91d6cc915a0c74ce08fba57",
        "1ba4e37997a2e986efa6cd844e43fd25b9e816359d31612baa9c18b71e3b5294",
        "271dacc9f4d0caf8ff708d7751532df465f1b6bf192cc169e6afc639faed6894",
        "2e97613f5a81eaa4f8a58f552a005713c0c8f333e026efb7771ad28429532374",
        "51c6b9f69c48a75b146d2785c3d70d336d5fdce24868f2e22db377d736f2ef24",
        "62f256676f138898cceaf949b873418772bcd271961225c6de34f6443d2c6ccb",
        "70cca582c4895337b234bb640fa2c13c72816d8ea4f6d8f679607a2e9c414ccb",
        "a0f007d863a0ed19c5bd996ef6eaab194af2f1ac685c0f71a75270a0366f8983",
        "a4aa2ac280bb8d1a0ce7a1be5a7bfb10292b49fe9435ad5cff19f421f3c70e41",
        "ac70b2d7feeb4b08ef9158cf5d5b274c66adb1360b471daee994d9e57f81771b",
        "bd848f96e7140691505c2e7fa56266ed0515b223ad2188d7aa428dfc77c2823f",
        "c2b35955576ffa710bfb7c4e5de8141335829cb1333377cbaf7daaeff9647b35",
        "c899567ee906851741bf7f3bde17a33777859ff9f53ff54d6f0ea54cf31ad636",
        "d6d7019ca9fcbf07c769e445342515ef0c92e4f18a96adbb3bf6460f5b0ba17f",
        "dcb6cc3991f9799eecfd71952439eb200a2b09fee01d033df9954a197ef8c574",
        "df62e3961d50812232f771efa50cd550a3e15655db66f9ed1557699c5ff4fd6b",
        "e514b0d3b0562f54b6622ba95659592c26a4f6473677346ffba9e876eee160ef",
        "e56002408dd4d44eacd5ba673bf87652fa4bfb3e9d23a986e6a948f606e5cbe3",
        "e680c440a2e92079ab1bf7a927e8d3920f1bcd173c0487e28e020110b2e59efc",
    }
)
# Any host named for what it does: mirrors.example.edu, pypi.corp.example, a devpi.
NAMED_FOR_IT = re.compile(
    r"(?<![\w.-])([\w-]+\.)*(mirrors?|pypi|devpi|artifactory|nexus)[\w-]*(\.[\w-]+)+(?![\w-])",
    re.I,
)
# A host-like word: dotted labels ending in a name of letters (file.py and v1.2 are looked up too,
# and match nothing).
HOSTNAME = re.compile(
    r"(?<![\w.-])((?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,})(?![\w-])", re.I
)
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


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def host_keys(host: str) -> list[str]:
    """The names a host is looked up by: itself, each domain above it (two labels or more),
    and itself with every two-letter label but the last written ``??``."""
    labels = host.lower().rstrip(".").split(".")
    keys = [".".join(labels[i:]) for i in range(len(labels) - 1)]
    wild = ["??" if len(x) == 2 and x.isalpha() else x for x in labels[:-1]] + labels[-1:]
    return [*keys, ".".join(wild)]


def listed_host(line: str, digests: Collection[str] = INDEX_HOST_DIGESTS) -> str | None:
    """The first host of ``line`` whose digest (or a domain's above it) is in ``digests``."""
    for found in HOSTNAME.finditer(line):
        if any(_digest(key) in digests for key in host_keys(found.group(1))):
            return found.group(1)
    return None


def offences(text: str, digests: Collection[str] = INDEX_HOST_DIGESTS) -> list[str]:
    """The lines of ``text`` that name an index or mirror host, or put a URL where one goes."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        hit = NAMED_FOR_IT.search(line) or PLACE.search(line)
        host = hit.group(0) if hit else listed_host(line, digests)
        if host:
            found.append(f"{number}: {host}")
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
        "ARG TORCH_INDEX=https://wheels.example.com/whl/cpu",
        "pip install --extra-index-url https://wheels.example.com/whl/cu130 torch",
        "pip install --index-url=https://packages.example.com/simple torch",
        "PIP_INDEX_URL=https://packages.example.com/repo",
        "index-url = https://packages.example.com/repo",
        "MIRROR=${DISTGROW_DEBIAN_MIRROR:-http://archive.example.net/debian}",
        "deb [arch=amd64] http://archive.example.net/debian bookworm main",
        "URIs: http://archive.example.net/debian",
        "debootstrap bookworm /tmp/root http://archive.example.net/debian",
        "see pypi.example.org for the wheel",
        "mirrors.example.edu.cn/pypi",
        "a devpi at devpi.corp.example:3141",
        # Listed hosts, by digest (here of hosts of the reserved .test domain, see LISTED).
        "conda install -c https://conda.channel.test/pytorch torch",
        "FROM registry.test/example/base:1",
        "FROM eu.registry.test/example/base:1",
        "see http://ftp.fr.archive.test/debian for the packages",
        "Registry.Test/example, upper case",
    ],
)
def test_an_index_or_mirror_is_caught(line: str) -> None:
    hits = offences(f"some text\n{line}\nmore text\n", LISTED)
    assert len(hits) == 1 and hits[0].startswith("2: "), hits


# Stand-ins for INDEX_HOST_DIGESTS: a host, a domain (all names under it), a country mirror.
LISTED = frozenset(_digest(h) for h in ("channel.test", "registry.test", "ftp.??.archive.test"))


def test_the_digest_list_is_sha256_of_lower_case_host_names() -> None:
    assert len(INDEX_HOST_DIGESTS) == 23
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in INDEX_HOST_DIGESTS)
    # Hosts the repository links to stay out of it, as do their domains.
    for harmless in ("github.com", "arxiv.org", "docker.io", "debian.org", "toronto.edu"):
        assert _digest(harmless) not in INDEX_HOST_DIGESTS, harmless
    assert host_keys("FTP.fr.Archive.test") == [
        "ftp.fr.archive.test",
        "fr.archive.test",
        "archive.test",
        "ftp.??.archive.test",
    ]


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
        "a file.py, version 1.2.3, and config.yaml",
        "notregistry.test and registry.testing are other hosts",
        "ftp.fra.archive.test is no two-letter mirror",
    ],
)
def test_a_link_that_is_no_index_passes(line: str) -> None:
    assert offences(line) == [] and offences(line, LISTED) == []
