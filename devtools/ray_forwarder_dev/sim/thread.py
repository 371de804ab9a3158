"""Run the simulator on its own event loop in a daemon thread, for synchronous callers
(the demo driver, Ray tests) that cannot host it on a loop of their own."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ray_forwarder_dev.sim.generator import Item
from ray_forwarder_dev.sim.server import (
    SentRecord,
    SimConfig,
    SimEndpoints,
    Simulator,
    stream_ticks,
)

T = TypeVar("T")


class SimulatorThread(SimEndpoints):
    """`with SimulatorThread(SimConfig(...)) as sim: connect to sim.url ...`

    Every method runs on the simulator's loop and waits for the result, so it is safe to
    call from any thread. Binds 127.0.0.1 on a free port unless the config says otherwise.
    """

    def __init__(self, config: SimConfig | None = None, *, start_timeout: float = 10.0):
        self.config = config or SimConfig()
        self.simulator = Simulator(self.config)
        self._start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._port: int | None = None

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> SimulatorThread:
        if self._thread is not None:
            raise RuntimeError("simulator thread already started")
        self._thread = threading.Thread(target=self._run, name="alpaca-sim", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout):
            raise TimeoutError("simulator did not start in time")
        if self._error is not None:
            raise RuntimeError("simulator failed to start") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self.simulator.stop(), loop)
        try:
            future.result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self.simulator.start())
            self._port = self.simulator.port
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    # --- calling into the loop --------------------------------------------------------

    def call(self, fn: Callable[..., Any] | str, *args: Any, timeout: float = 30.0, **kw: Any):
        """Run `fn(*args, **kw)` (or the simulator method named `fn`) on the simulator's
        loop and return its result; awaitables are awaited there."""
        if self._loop is None or not self._ready.is_set():
            raise RuntimeError("simulator thread not running")
        target = getattr(self.simulator, fn) if isinstance(fn, str) else fn

        async def run() -> Any:
            result = target(*args, **kw)
            if inspect.isawaitable(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("simulator thread not running")
        return self._port

    # --- faults -----------------------------------------------------------------------

    def drop_connections(self) -> int:
        return self.call(self.simulator.drop_connections)

    def end_feed(self) -> int:
        return self.call("end_feed")

    def stall_connections(self) -> int:
        return self.call(self.simulator.stall_connections)

    def starve_connection(self) -> int | None:
        return self.call(self.simulator.starve_connection)

    def omit_from_subscription(self, symbol: str, replies: int | None = 1) -> None:
        self.call(self.simulator.omit_from_subscription, symbol, replies)

    def set_market_open(self, flag: bool) -> None:
        self.call(self.simulator.set_market_open, flag)

    def set_clock_available(self, flag: bool) -> None:
        self.call(self.simulator.set_clock_available, flag)

    def refuse_rest(self, status: int | None = 403) -> None:
        self.call(self.simulator.refuse_rest, status)

    def set_rest_rate_limit(self, every: int | None) -> None:
        self.call(self.simulator.set_rest_rate_limit, every)

    def minute_bars(self) -> dict[tuple[str, str], Item]:
        """Every closed minute's bar (latest revision) by (symbol, t), as REST serves it."""
        return self.call(
            lambda: {
                (symbol, bar["t"]): bar
                for symbol, bars in self.simulator.market.minute_bars.items()
                for mark, bar in bars
                if mark <= self.simulator.market.now_ns
            }
        )

    def ticks(self, kind: str) -> list[Item]:
        """Every trade (`kind` "t") or quote ("q") the market handed out so far (kept: the
        last `tick_history`), whether or not a connection received it, as the simulator's
        stream sends it (crypto, options: their items' shape)."""
        market, transform = self.simulator.market, self.simulator.stream.transform
        return self.call(
            lambda: stream_ticks(
                (i for i in market.ticks[kind] if i["t"] <= market.now), kind, transform
            )
        )

    def rest_log(self) -> list[tuple[float, int]]:
        return self.call(lambda: list(self.simulator.rest_log))

    def reject_auth(self, flag: bool = True) -> None:
        self.call(self.simulator.reject_auth, flag)

    def refuse_connections(self, flag: bool = True) -> None:
        self.call(self.simulator.refuse_connections, flag)

    def send_error(self, code: int, msg: str | None = None, close: bool = True) -> int:
        return self.call(self.simulator.send_error, code, msg, close)

    def inject_malformed(self, n: int = 1) -> int:
        return self.call(self.simulator.inject_malformed, n)

    def set_duplicate_ratio(self, ratio: float) -> None:
        self.call(self.simulator.set_duplicate_ratio, ratio)

    # --- accounting (snapshots taken on the loop) -------------------------------------

    def stats(self) -> dict[str, int]:
        return self.call(self.simulator.stats)

    def sent(self) -> list[SentRecord]:
        return self.call(lambda: self.simulator.sent)

    def sent_by_connection(self) -> dict[int, list[SentRecord]]:
        return self.call(self.simulator.sent_by_connection)

    def distinct_items(self) -> list[Item]:
        return self.call(self.simulator.distinct_items)

    def active_connections(self, key: str | None = None) -> int:
        return self.call(self.simulator.active_connections, key)

    @property
    def connection_count(self) -> int:
        return self.active_connections()

    @property
    def finished(self) -> bool:
        return self.call(lambda: self.simulator.finished)

    def wait_sent(self, n: int, timeout: float) -> bool:
        return self.call(self.simulator.wait_sent, n, timeout, timeout=timeout + 5)

    def wait_finished(self, timeout: float) -> bool:
        return self.call(self.simulator.wait_finished, timeout, timeout=timeout + 5)
