"""liveindex pipeline runtime: protocol, publisher, workers, sink."""

__version__ = "0.1.0"
