"""Benchmarks behind `rxt bench`: RxT against a stateless decoder-only baseline."""
