"""Benchmarks: ``python -m benchmarks MODE [args]`` (``launcher/bench.sh MODE``).

Each mode is a module here with ``main(argv) -> int`` that warms up, measures, prints a
table a person can compare (hardware, versions, config, commit) and, as its last line, one
JSON object with the numbers.
"""
