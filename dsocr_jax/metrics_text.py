"""Character and word error rates: Levenshtein distance over characters / whitespace-separated words.

CER = (substitutions + deletions + insertions) / len(reference). Corpus figures sum the edits and the reference
lengths over all pairs (not a mean of per-pair rates), as OCR benchmarks report them. An empty reference counts
as length 1, so the rate is then the number of inserted units (0 for an empty hypothesis).
"""

from __future__ import annotations

from typing import Sequence


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
  """Levenshtein distance with unit costs, O(len(ref) * len(hyp)) time, O(len(hyp)) memory."""
  prev = list(range(len(hyp) + 1))
  for i, r in enumerate(ref, 1):
    cur = [i] + [0] * len(hyp)
    for j, h in enumerate(hyp, 1):
      cur[j] = min(prev[j] + 1,  # deletion of r
                   cur[j - 1] + 1,  # insertion of h
                   prev[j - 1] + (r != h))  # substitution (or match)
    prev = cur
  return prev[-1]


def _rate(pairs: Sequence[tuple[Sequence, Sequence]]) -> float:
  edits = sum(edit_distance(r, h) for r, h in pairs)
  length = sum(max(len(r), 1) for r, _ in pairs)
  return edits / length if length else 0.0


def _as_pairs(ref, hyp) -> list[tuple[str, str]]:
  if isinstance(ref, str) != isinstance(hyp, str):
    raise ValueError("cer/wer: ref and hyp must both be strings or both be lists of strings")
  if isinstance(ref, str):
    return [(ref, hyp)]
  if len(ref) != len(hyp):
    raise ValueError(f"cer/wer: {len(ref)} references but {len(hyp)} hypotheses")
  return list(zip(ref, hyp))


def cer(ref: str | Sequence[str], hyp: str | Sequence[str]) -> float:
  """Character error rate of one pair, or the corpus rate of two equally long lists."""
  return _rate(_as_pairs(ref, hyp))


def wer(ref: str | Sequence[str], hyp: str | Sequence[str]) -> float:
  """Word error rate (words = `str.split()`), of one pair or of two equally long lists."""
  return _rate([(r.split(), h.split()) for r, h in _as_pairs(ref, hyp)])
