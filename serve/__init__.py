"""OpenAI-compatible HTTP server for dsocr-jax: `python -m serve --checkpoint DIR` (see serve/__main__.py)."""
