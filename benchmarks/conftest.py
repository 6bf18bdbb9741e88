"""Options of the pytest-benchmark benchmarks (``pytest benchmarks --benchmark-only``)."""


def pytest_addoption(parser):
    group = parser.getgroup("fused_wloss benchmarks")
    group.addoption("--bench-device", default="cpu", choices=["cpu", "cuda"],
                    help="device the benchmarks run on (default cpu)")
