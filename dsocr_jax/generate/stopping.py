"""Host-side rules that look at a request's generated ids or text: the no-repeat n-gram ban, the loop detector
and stop strings. They run between decode steps on numpy / str data (cheap next to a step) and feed the jitted
step only a small array of banned ids.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

# Token strings the official OCR scripts exempt from the n-gram ban (table cells repeat legitimately). The
# released ids are 128821/128822 (spec 5.6); we look them up by string so other vocabularies work too.
NGRAM_WHITELIST_TOKENS = ("<td>", "</td>")


def ngram_banned_ids(generated: Sequence[int] | np.ndarray, ngram_size: int, window: int,
                     whitelist: Iterable[int] = ()) -> np.ndarray:
  """The official windowed no-repeat n-gram rule (OFF-VLLM `NoRepeatNGramLogitsProcessor`, spec 5.6).

  `generated` are the request's output ids only (the prompt is excluded). With L = len(generated) and
  prefix = the last n-1 ids: for every start i in [max(0, L - window), L - n] (inclusive), if
  generated[i : i+n-1] == prefix then generated[i+n-1] is banned. Whitelisted ids are never banned.
  Returns the sorted unique banned ids.
  """
  ids = np.asarray(generated, dtype=np.int64)
  n, length = ngram_size, len(ids)
  if n <= 0 or length < n:
    return np.zeros((0,), np.int64)
  first, last = max(0, length - window), length - n
  if last < first:
    return np.zeros((0,), np.int64)
  if n == 1:  # empty prefix: every id in the window would complete a repeated 1-gram
    banned = ids[first:last + 1]
  else:
    prefix = ids[length - n + 1:]
    starts = np.arange(first, last + 1)
    grams = np.lib.stride_tricks.sliding_window_view(ids, n - 1)[starts]  # [starts, n-1]
    banned = ids[starts[np.all(grams == prefix, axis=1)] + n - 1]
  banned = np.unique(banned)
  white = np.fromiter(whitelist, dtype=np.int64)
  return banned[~np.isin(banned, white)] if white.size else banned


class RepetitionDetector:
  """Detects a generation stuck in a loop: its tail is one span repeated back to back.

  Incremental and O(max_span) per token: for every period p it keeps run[p], the number of trailing tokens t
  with t == the token p places earlier. The tail is then (run[p] + p) / p copies of a p-token span. It fires
  when, for some p in [min_span, max_span], that is >= min_repeats copies covering >= min_tokens tokens.
  """

  def __init__(self, min_span: int, max_span: int, min_repeats: int, min_tokens: int):
    self.periods = np.arange(min_span, max_span + 1)
    self.min_repeats = min_repeats
    self.min_tokens = min_tokens
    self.history = np.zeros(0, np.int64)  # only the last max_span tokens are kept
    self.run = np.zeros(len(self.periods), np.int64)
    self.seen = 0
    self.max_span = max_span

  def add(self, token: int) -> bool:
    """Appends one generated token; True when the tail is now a loop."""
    h = self.history
    valid = self.periods <= len(h)
    earlier = np.where(valid, h[np.maximum(len(h) - self.periods, 0)] if len(h) else 0, -1)
    self.run = np.where(valid & (earlier == token), self.run + 1, 0)
    self.history = np.append(h, token)[-self.max_span:]
    self.seen += 1
    covered = self.run + self.periods
    return bool(np.any((self.run > 0) & (covered >= self.periods * self.min_repeats) &
                       (covered >= self.min_tokens)))


class StopStrings:
  """Finds stop strings in streamed text, across token boundaries, and holds back text that may start one.

  `feed(delta)` returns (text safe to emit now, matched stop string or None). On a match the text up to (not
  including) the stop string is returned and the rest is dropped.
  """

  def __init__(self, stops: Sequence[str]):
    self.stops = tuple(stops)
    self.max_len = max((len(s) for s in self.stops), default=0)
    self.pending = ""  # text received but not yet emitted (could be the start of a stop string)

  def feed(self, delta: str) -> tuple[str, str | None]:
    if not self.stops:
      return delta, None
    text = self.pending + delta
    best = None
    for s in self.stops:
      i = text.find(s)
      if i >= 0 and (best is None or i < best[0]):
        best = (i, s)
    if best is not None:
      self.pending = ""
      return text[:best[0]], best[1]
    hold = 0
    for k in range(min(self.max_len - 1, len(text)), 0, -1):
      if any(s.startswith(text[-k:]) for s in self.stops):
        hold = k
        break
    self.pending = text[len(text) - hold:]
    return text[:len(text) - hold], None

  def flush(self) -> str:
    """What was held back, at the end of a generation that did not stop on a stop string."""
    text, self.pending = self.pending, ""
    return text
