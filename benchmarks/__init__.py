"""Performance harness for switchnorm: ``python -m benchmarks.layer --help``."""
