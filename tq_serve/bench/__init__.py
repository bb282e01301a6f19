"""Benchmarks: `python -m tq_serve.bench {distortion,kernels,capacity,quality,serve}`. Each prints a table, writes
JSON with versions and the git commit, and compares against a peer measured in the same run."""
