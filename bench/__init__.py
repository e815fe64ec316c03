"""Benchmarks of the Shortcut engine and server against Hugging Face `generate` baselines (`python -m bench.run`)."""
