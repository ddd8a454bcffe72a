"""The benchmark harness (not part of the installed package): see docs/benchmarks.md."""
