"""Benchmarks: every fast path against its reference, end-to-end throughput, encoder inference.

``python -m bench --suite cpu|gpu [--smoke]`` appends rows to ``bench/results/<suite>.csv``;
``python -m bench.report`` renders plots and the table in ``bench/README.md``.
"""
