"""Benchmarks of the training core against a bare PyTorch loop and a DataLoader loop (see benchmarks/README.md)."""
