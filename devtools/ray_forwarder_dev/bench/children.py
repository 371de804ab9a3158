"""The bench's child processes: started with `python -m`, talked to by JSON lines.

Each child reports on stdout (`{"event": ...}` lines; anything else is ignored) and is told
to leave with `exit` on stdin. Its stderr goes to a log file in the run's work dir, whose
tail is quoted when the child fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import orjson


class ChildFailed(RuntimeError):
    pass


class Child:
    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(
        cls,
        name: str,
        module: str,
        args: list[str],
        workdir: Path,
        env: dict[str, str] | None = None,
    ) -> Child:
        log = workdir / f"{name}.log"
        with log.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, **(env or {})},
                limit=1 << 24,
            )
        return cls(name, proc, log)

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next stdout line announcing `event`."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await self.proc.stdout.readline()
                    if not line:
                        await self.proc.wait()
                        raise ChildFailed(
                            f"{self.name} exited ({self.proc.returncode}) before "
                            f"'{event}':\n{self.tail()}"
                        )
                    if not line.startswith(b"{"):
                        continue
                    with contextlib.suppress(orjson.JSONDecodeError):
                        message = orjson.loads(line)
                        if message.get("event") == event:
                            return message
        except TimeoutError:
            raise ChildFailed(f"{self.name}: no '{event}' in {timeout:g}s\n{self.tail()}") from None

    async def exit(self, timeout: float) -> int | None:
        """Ask it to leave; stop it if it does not. Returns its exit code."""
        if self.proc.returncode is None and self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.proc.stdin.write(b"exit\n")
                await self.proc.stdin.drain()
                self.proc.stdin.close()
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.kill()
            return await self.proc.wait()

    async def expect_while(self, other: Child, event: str, timeout: float) -> dict[str, Any]:
        """`expect(event)`, but fail at once (with its log) if `other` exits meanwhile."""
        waiting = asyncio.ensure_future(self.expect(event, timeout))
        exited = asyncio.ensure_future(other.proc.wait())
        try:
            await asyncio.wait([waiting, exited], return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if not waiting.done():
            waiting.cancel()
            raise ChildFailed(
                f"{other.name} exited ({other.proc.returncode}) while waiting for "
                f"{self.name}'s '{event}':\n{other.tail()}"
            )
        return waiting.result()

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])
