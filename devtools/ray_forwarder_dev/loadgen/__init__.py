"""A load generator for benchmarks: Alpaca's protocol over a real WebSocket, replaying frames
that were encoded before the clock starts, from a process of its own.

Unlike the simulator (`sim/`), which produces and encodes items while it sends and keeps
exact per-item accounting for fault tests, the load generator does all its work up front so
that what it measures is the system under test, not itself: `feed.py` builds the items (with
`sim.generator.Market`) and the frames (pure), `server.py` replays them, `null_client.py`
reads and discards them to measure the generator's own ceiling.
"""
