"""Load test of `python -m serve`: N concurrent clients, throughput, latency, time to first token, server overhead.

    python bench/serve.py [--checkpoint DIR (default: the golden tiny checkpoint)] [--concurrency 1,8,32]
                          [--requests 0 (= max(8, 2 x concurrency))] [--mode small] [--max-tokens 32]
                          [--url http://... (use a running server instead of starting one)]

Per concurrency level C, C client threads send non-streamed chat requests (one golden image as a data URI,
greedy, fixed length through `ignore_eos`) back to back. Reported:
  * requests/s and completion tokens/s over the level's wall time;
  * latency p50 / p99 as the client sees it;
  * time to first token: the server's own histogram (/metrics), mean over the level;
  * server overhead per request: X-Server-Seconds - X-Engine-Seconds - X-Prepare-Seconds (HTTP, validation,
    admission, JSON), and the image preparation time (decode + preprocess + vision encode) separately.
Peer: the same requests submitted straight to an in-process `Engine` on the same model (image features computed
once), at the same concurrency; `engine_only_tokens_per_s` and the ratio server/engine say what the HTTP layer
plus per-request vision costs. The last line is JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time

import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from serve.process import ServerProcess, data_uri  # noqa: E402

GOLDEN = os.environ.get("DSOCR_GOLDEN_DIR", os.path.join(REPO, "..", "shared", "golden"))
IMAGE = os.path.join(GOLDEN, "images", "small_500x400.png")


def _loadavg() -> str:
  with open("/proc/loadavg") as f:
    return f.read().split(" ")[0]


def _metric_sum_count(url: str, name: str) -> tuple[float, float]:
  values = {}
  for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
    for suffix in ("_sum", "_count"):
      if line.startswith(name + suffix + " "):
        values[suffix] = float(line.split()[1])
  return values.get("_sum", 0.0), values.get("_count", 0.0)


def _body(args) -> dict:
  return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(IMAGE)}},
                                                    {"type": "text", "text": "Free OCR."}]}],
          "temperature": 0, "max_tokens": args.max_tokens, "mode": args.mode, "ignore_eos": True,
          "ngram_size": 0, "repetition_stop": False}


def run_level(url: str, body: dict, concurrency: int, total: int, headers: dict) -> dict:
  payload = json.dumps(body).encode()
  ttft_before = _metric_sum_count(url, "dsocr_time_to_first_token_seconds")
  records = []

  def client(n: int):
    out = []
    with httpx.Client(base_url=url, headers=headers, timeout=600) as http:
      for _ in range(n):
        t0 = time.perf_counter()
        r = http.post("/v1/chat/completions", content=payload, headers={"Content-Type": "application/json"})
        latency = time.perf_counter() - t0
        r.raise_for_status()
        h = r.headers
        out.append(dict(latency=latency, tokens=r.json()["usage"]["completion_tokens"],
                        server=float(h["x-server-seconds"]), engine=float(h["x-engine-seconds"]),
                        prepare=float(h["x-prepare-seconds"])))
    return out

  shares = [total // concurrency + (i < total % concurrency) for i in range(concurrency)]
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    for out in pool.map(client, shares):
      records.extend(out)
  wall = time.perf_counter() - start
  ttft_after = _metric_sum_count(url, "dsocr_time_to_first_token_seconds")
  lat = np.array([r["latency"] for r in records])
  overhead = np.array([r["server"] - r["engine"] - r["prepare"] for r in records])
  n_ttft = ttft_after[1] - ttft_before[1]
  return dict(
      concurrency=concurrency, requests=len(records), wall_s=round(wall, 3),
      requests_per_s=round(len(records) / wall, 3),
      tokens_per_s=round(sum(r["tokens"] for r in records) / wall, 2),
      latency_p50_s=round(float(np.percentile(lat, 50)), 4), latency_p99_s=round(float(np.percentile(lat, 99)), 4),
      ttft_mean_s=round((ttft_after[0] - ttft_before[0]) / n_ttft, 4) if n_ttft else None,
      prepare_mean_s=round(float(np.mean([r["prepare"] for r in records])), 4),
      engine_mean_s=round(float(np.mean([r["engine"] for r in records])), 4),
      server_overhead_mean_ms=round(float(np.mean(overhead)) * 1e3, 3),
      server_overhead_p99_ms=round(float(np.percentile(overhead, 99)) * 1e3, 3),
      transport_mean_ms=round(float(np.mean([r["latency"] - r["server"] for r in records])) * 1e3, 3),
      loadavg=_loadavg())


def engine_only(args, concurrency_levels: list[int], totals: list[int]) -> dict[int, float]:
  """Completion tokens/s of the bare engine on the same prompt (features computed once), per level."""
  from dsocr_jax.checkpoint.load import load_model
  from dsocr_jax.generate.engine import Engine, GenerationRequest, SamplingParams
  from dsocr_jax.image.decode import open_image
  from dsocr_jax.image.preprocess import preprocess
  from dsocr_jax.text.prompt import build_prompt
  from dsocr_jax.text.tokenizer import Tokenizer

  loaded = load_model(args.checkpoint)
  tok = Tokenizer.from_checkpoint(args.checkpoint)
  pre = preprocess(open_image(IMAGE), args.mode)
  feats = np.asarray(loaded.model.image_features(pre.global_view, pre.tiles if pre.num_tiles else None,
                                                 pre.spatial_crop))
  prompt = build_prompt("<image>\nFree OCR.", [pre], tok)
  out = {}
  for c, total in zip(concurrency_levels, totals):
    engine = Engine(loaded.model, tok, max_slots=args.max_batch, max_seq_len=args.max_seq_len,
                    prefill_buckets=(args.max_seq_len,), max_queue=max(64, total))
    engine.warmup()
    with engine:
      sampling = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, ngram_size=0, repetition_stop=False)

      def one(_):
        return engine.generate(GenerationRequest(prompt.input_ids, sampling, prompt.images_seq_mask, feats))

      start = time.perf_counter()
      with concurrent.futures.ThreadPoolExecutor(c) as pool:
        results = list(pool.map(one, range(total)))
      wall = time.perf_counter() - start
    out[c] = round(sum(r.completion_tokens for r in results) / wall, 2)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", default=GOLDEN)
  p.add_argument("--url", help="benchmark a running server instead of starting one (no engine-only peer)")
  p.add_argument("--api-key")
  p.add_argument("--concurrency", default="1,8,32")
  p.add_argument("--requests", type=int, default=0, help="per level; 0 = max(8, 2 x concurrency)")
  p.add_argument("--mode", default="small")
  p.add_argument("--max-tokens", type=int, default=32)
  p.add_argument("--max-batch", type=int, default=8)
  p.add_argument("--max-seq-len", type=int, default=512)
  args = p.parse_args()
  levels = [int(c) for c in args.concurrency.split(",")]
  totals = [args.requests or max(8, 2 * c) for c in levels]
  headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
  body = _body(args)

  server = None
  if args.url is None:
    server = ServerProcess(["--checkpoint", args.checkpoint, "--max-batch", str(args.max_batch),
                            "--max-seq-len", str(args.max_seq_len), "--prefill-buckets", str(args.max_seq_len),
                            "--warmup-modes", args.mode, "--max-pending", str(max(64, max(levels)))])
  url = args.url or server.url
  try:
    run_level(url, body, 1, 2, headers)  # compiles anything the warm-up did not (tile shapes, first request)
    results = []
    for c, total in zip(levels, totals):
      results.append(run_level(url, body, c, total, headers))
      print(json.dumps(results[-1]), flush=True)
  finally:
    if server is not None:
      server.stop()
  peer = engine_only(args, levels, totals) if args.url is None else {}
  summary = dict(bench="serve", checkpoint=os.path.basename(os.path.normpath(args.checkpoint)), mode=args.mode,
                 max_tokens=args.max_tokens, max_batch=args.max_batch, levels=results,
                 engine_only_tokens_per_s={str(k): v for k, v in peer.items()},
                 server_vs_engine_tokens_ratio={str(r["concurrency"]): round(r["tokens_per_s"] / peer[r["concurrency"]], 3)
                                                for r in results if r["concurrency"] in peer},
                 loadavg=_loadavg())
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
