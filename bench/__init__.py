"""Benchmarks of llama-gateway (not tests): run each as ``python -m bench.<name>``."""
