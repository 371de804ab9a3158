"""ray-forwarder: Alpaca market data to Kafka, on Ray."""

__version__ = "0.1.0"
