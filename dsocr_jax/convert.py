"""`python -m dsocr_jax.convert SRC DST ...`: the converter CLI (dsocr_jax.checkpoint.convert)."""

import sys

from dsocr_jax.checkpoint.convert import convert, main

__all__ = ["convert", "main"]

if __name__ == "__main__":
  sys.exit(main())
