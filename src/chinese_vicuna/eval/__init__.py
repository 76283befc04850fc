"""Evaluation: benchmarks, perplexity, adapter comparison and text metrics."""
