"""fused_wloss benchmarks: ``python -m benchmarks`` (the driver) and ``pytest benchmarks --benchmark-only``."""
