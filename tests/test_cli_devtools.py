"""`ray-forwarder demo` / `bench` where the development tools are not installed (the wheel, the
image): one clear line and exit 2, while the runtime commands work as before.

The subprocess hides `ray_forwarder_dev` (None in sys.modules makes its import fail as a
missing package does), so these run from a clone where `uv sync` did install it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

RUN_CLI = "import sys; from ray_forwarder.cli import main; sys.exit(main(sys.argv[1:]))"
HIDE_DEV_TOOLS = "import sys; sys.modules['ray_forwarder_dev'] = None; "


def cli(*argv: str, hide_dev_tools: bool = True) -> subprocess.CompletedProcess[str]:
    code = (HIDE_DEV_TOOLS if hide_dev_tools else "") + RUN_CLI
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "argv",
    [("demo",), ("demo", "--duration", "5"), ("bench",), ("bench", "--events", "10")],
)
def test_dev_command_without_the_dev_tools_says_where_to_run_it(argv):
    result = cli(*argv)
    command = argv[0]
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"ray-forwarder: the {command} is a development tool, not installed here: run it "
        f"from a clone of the repository (`uv run ray-forwarder {command}`)"
    ]


def test_runtime_commands_work_without_the_dev_tools():
    schema = cli("schema")
    assert schema.returncode == 0, schema.stderr
    assert '"$schema"' in schema.stdout
    usage = cli("--help")
    assert usage.returncode == 0 and "demo" in usage.stdout and "bench" in usage.stdout
    wrong = cli("schema", "--no-such-option")
    assert wrong.returncode == 2
    assert "unrecognized arguments: --no-such-option" in wrong.stderr


def test_bench_options_come_from_the_dev_tools_when_installed():
    assert "--events" in cli("bench", "--help", hide_dev_tools=False).stdout
    assert "--events" not in cli("bench", "--help").stdout
