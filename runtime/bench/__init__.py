"""Benchmarks: throughput, memory against stream length, feeding in pieces, every CPU path, serving; one
measure module (RSS, percentiles, the plot helper). The `infini bench` commands are wiring over these."""
