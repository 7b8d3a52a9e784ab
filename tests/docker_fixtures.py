"""The Docker engine, base image and ``distgrow:test`` image the container tests share.

A Docker engine is started if none answers (``scripts/docker_engine.sh``: Debian's docker.io
with its own data root and socket) and the base image is made with debootstrap (no registry is
reachable here). The build context is what the Dockerfile copies, plus ``docker/wheels/``
holding this machine's torch wheel and the Horovod wheel ``bootstrap.sh`` built, so the image
installs the same stack as CI without a second Horovod build.

The fixtures are registered in ``conftest.py`` (session scope: one engine and one image build
for ``test_docker_image.py`` and ``test_two_nodes.py`` together).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

ENGINE = REPO_ROOT / "scripts" / "docker_engine.sh"
ENGINE_UNAVAILABLE = 3
IMAGE = "distgrow:test"
BASE = "distgrow-base:bookworm"


def _sh(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def docker_env() -> Iterator[dict[str, str]]:
    """An environment whose ``docker`` reaches a running engine holding the base image."""
    started = time.monotonic()
    proc = _sh(["bash", str(ENGINE), "start"], dict(os.environ), 300)
    if proc.returncode == ENGINE_UNAVAILABLE:
        pytest.skip(f"no Docker engine and none installable here: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"docker_engine.sh start failed:\n{proc.stderr}"
    found = dict(line.split("=", 1) for line in proc.stdout.split() if "=" in line)
    env = {**os.environ, "DOCKER_HOST": found["DOCKER_HOST"], "DOCKER_BUILDKIT": "0"}
    try:
        base = _sh(["bash", str(ENGINE), "base"], env, 900)
        assert base.returncode == 0, f"docker_engine.sh base failed:\n{base.stderr}"
        print(f"docker engine and {BASE} ready in {time.monotonic() - started:.0f} s")
        yield env
    finally:
        # Images this session's rebuilds left untagged; the tagged one stays as the layer cache.
        _sh(["docker", "image", "prune", "-f"], env, 300)
        if found.get("DISTGROW_DOCKER_STARTED") == "1":
            _sh(["bash", str(ENGINE), "stop"], env, 120)


def _copied_paths() -> list[str]:
    text = (REPO_ROOT / "Dockerfile").read_text()
    return [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]


def _horovod_wheel() -> Path | None:
    """The wheel install_horovod.sh built for this torch (bootstrap ran before the tests)."""
    import torch

    cache = Path(os.environ.get("DISTGROW_WHEEL_CACHE", Path.home() / ".cache/distgrow/wheels"))
    key = f"torch-{torch.__version__}_cp311"
    wheels = sorted(glob.glob(str(cache / f"horovod-*_{key}_*" / "horovod-*.whl")))
    return Path(wheels[-1]) if wheels else None


def stage_context(ctx: Path) -> list[str]:
    """What the Dockerfile copies, and the wheels; returns the names of the wheels staged."""
    for src in ["Dockerfile", ".dockerignore", *_copied_paths()]:
        path = REPO_ROOT / src
        if path.is_dir():
            shutil.copytree(
                path, ctx / src, ignore=shutil.ignore_patterns("__pycache__", "*.whl", "*.crt")
            )
        else:
            (ctx / src).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, ctx / src)
    wheels = ctx / "docker" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    # torch from wherever this machine's pip finds the pinned build (a local wheel here; the
    # CPU index elsewhere): the image must not look for it on an index it cannot reach.
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels)]
    got = subprocess.run(
        [*pip, "-c", str(REPO_ROOT / "constraints.txt"), "torch"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert got.returncode == 0, f"pip download torch failed:\n{got.stderr}"
    horovod = _horovod_wheel()
    if horovod is not None:
        shutil.copy2(horovod, wheels / horovod.name)
    # The CA bundle this machine's pip trusts (PIP_CERT and the like: a TLS-intercepting proxy
    # here), for the build's downloads (docker/certs/README.md).
    for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        bundle = os.environ.get(name)
        if bundle and Path(bundle).is_file():
            shutil.copy2(bundle, ctx / "docker" / "certs" / "build-host.crt")
            break
    return sorted(p.name for p in wheels.glob("*.whl"))


@pytest.fixture(scope="session")
def image(docker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """``distgrow:test``, built from the Dockerfile as a user would (CPU torch).

    ``DISTGROW_TEST_IMAGE=TAG`` uses an image built before from this same tree (a CI step of
    its own, or a developer's rerun) instead: it is tagged ``distgrow:test`` and not rebuilt.
    """
    given = os.environ.get("DISTGROW_TEST_IMAGE")
    if given:
        found = _sh(["docker", "image", "inspect", given], docker_env, 60)
        assert found.returncode == 0, f"DISTGROW_TEST_IMAGE={given}: no such image"
        if given != IMAGE:
            tagged = _sh(["docker", "tag", given, IMAGE], docker_env, 60)
            assert tagged.returncode == 0, tagged.stderr
        return IMAGE
    ctx = tmp_path_factory.mktemp("docker-context")
    staged = stage_context(ctx)
    assert any(name.startswith("torch-") for name in staged), staged
    started = time.monotonic()
    proc = _sh(
        [
            "docker",
            "build",
            "--build-arg",
            f"BASE={BASE}",
            # No index named: torch comes from docker/wheels, the rest from pip's own default.
            "-t",
            IMAGE,
            str(ctx),
        ],
        docker_env,
        2100,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"docker build failed:\n{tail}"
    print(f"docker build: {time.monotonic() - started:.0f} s, wheels staged: {staged}")
    return IMAGE


def docker_run(env: dict[str, str], out: Path, *args: str, entrypoint: str | None = None) -> str:
    """``docker run`` with no network, ``out`` mounted at /out; fails the test on an error."""
    cmd = [
        "docker",
        "run",
        "--rm",
        "--network=none",
        "--hostname=localhost",
        "--shm-size=1g",
        "-e",
        "WANDB_MODE=disabled",
        "-v",
        f"{out}:/out",
    ]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    proc = _sh([*cmd, IMAGE, *args], env, 900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{output[-6000:]}"
    return output
