"""Throughput and memory benchmarks (`cxrfast bench NAME`). Each writes JSON + a PNG plot
and appends a row to bench/RESULTS.md. Benchmarks are not tests: they assert nothing about time."""
