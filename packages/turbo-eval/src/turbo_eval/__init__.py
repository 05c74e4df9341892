"""turbo-eval: the Turbo benchmark suite (quality against throughput, FLOPs and memory)."""

__version__ = "0.1.0"
