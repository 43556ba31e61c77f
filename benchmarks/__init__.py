"""Side-by-side benchmarks of ridgeline against peer libraries (``python -m benchmarks NAME``)."""
