"""`python -m serve`: the OpenAI-compatible OCR server.

    python -m serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--dtype float32|bfloat16]
                    [--max-batch N] [--max-seq-len N] [--default-mode gundam] [--api-key KEY]
                    [--served-model-name NAME] [--mesh SPEC] ...

Without --checkpoint it serves an embedded random-init tiny model (`serve.default_model`), announced as such.

Lifecycle for a load balancer: the port opens at once and /health answers; the model loads and compiles in the
background and /ready turns 200 only when that is done. SIGTERM starts a drain: /ready turns 503, new chat
requests get 503, admitted requests run to completion (at most --drain-timeout seconds), then the process exits
0. A second SIGTERM or a SIGINT stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time

import uvicorn

from dsocr_jax.config import MODES
from serve.app import ServerSettings, ServerState, create_app
from serve.images import DEFAULT_MAX_BYTES, FetchLimits

log = logging.getLogger("serve")


def parse_args(argv=None) -> argparse.Namespace:
  from dsocr_jax.sharding import add_mesh_argument
  p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", metavar="DIR",
                 help="released-layout or converted checkpoint directory (default: embedded random tiny model)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype (float32 is faster on CPU, see shared/perf-notes.md)")
  p.add_argument("--max-batch", type=int, default=8, help="engine slots decoded together")
  p.add_argument("--max-seq-len", type=int, default=4096, help="prompt + completion tokens per request")
  p.add_argument("--prefill-buckets", metavar="N,N,...",
                 help="prompt lengths compiled for prefill (default: 128, 256, ... up to --max-seq-len)")
  p.add_argument("--default-mode", choices=sorted(MODES), default="gundam",
                 help="resolution mode for images without `mode` (detail=low always means tiny)")
  p.add_argument("--warmup-modes", metavar="MODE,...",
                 help="modes whose global view is compiled before /ready (default: --default-mode and tiny; "
                 "'' = none)")
  p.add_argument("--max-crops", type=int, default=6, help="default upper bound on Gundam tiles (2..9)")
  p.add_argument("--api-key", default=os.environ.get("DSOCR_API_KEY"),
                 help="require 'Authorization: Bearer KEY' on /v1 routes (default: env DSOCR_API_KEY, else off)")
  p.add_argument("--served-model-name", help="model id in /v1/models (default: checkpoint directory name)")
  p.add_argument("--max-pending", type=int, default=64,
                 help="chat requests admitted at once (generating + queued); more get 429")
  p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_BYTES)
  p.add_argument("--max-image-pixels", type=int, default=40_000_000)
  p.add_argument("--image-fetch-timeout", type=float, default=10.0, help="seconds per image URL")
  p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for in-flight requests")
  p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
  add_mesh_argument(p)
  args = p.parse_args(argv)
  for name in ("max_batch", "max_seq_len", "max_pending", "max_image_bytes", "max_image_pixels"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
  if not 2 <= args.max_crops <= 9:
    p.error(f"--max-crops: must be in [2, 9], got {args.max_crops}")
  if not 0 <= args.port <= 65535:
    p.error(f"--port: must be in [0, 65535], got {args.port}")
  if args.checkpoint is not None and not os.path.isdir(args.checkpoint):
    p.error(f"--checkpoint: {args.checkpoint} is not a directory")
  if args.prefill_buckets is not None:
    try:
      args.prefill_buckets = tuple(sorted({int(b) for b in args.prefill_buckets.split(",")}))
    except ValueError:
      p.error(f"--prefill-buckets: expected comma-separated integers, got {args.prefill_buckets!r}")
    if args.prefill_buckets[0] < 1 or args.prefill_buckets[-1] > args.max_seq_len:
      p.error(f"--prefill-buckets: lengths must lie in [1, --max-seq-len={args.max_seq_len}]")
  else:
    args.prefill_buckets = _prefill_buckets(args.max_seq_len)
  if args.warmup_modes is None:
    args.warmup_modes = tuple(dict.fromkeys((args.default_mode, "tiny")))
  else:
    args.warmup_modes = tuple(m.strip() for m in args.warmup_modes.split(",") if m.strip())
    unknown = [m for m in args.warmup_modes if m not in MODES]
    if unknown:
      p.error(f"--warmup-modes: unknown mode(s) {unknown}; expected some of {sorted(MODES)}")
  if args.api_key == "":
    args.api_key = None
  return args


def _prefill_buckets(max_seq_len: int) -> tuple[int, ...]:
  buckets, b = [], 128
  while b < max_seq_len:
    buckets.append(b)
    b *= 2
  return tuple(buckets + [max_seq_len])


def build_service(args: argparse.Namespace):
  """Loads (or builds) the model, starts the engine and warms everything up. Runs on a background thread."""
  import jax.numpy as jnp
  from dsocr_jax.generate.engine import Engine
  from dsocr_jax.text.tokenizer import Tokenizer
  from serve import default_model
  from serve.service import OCRService, ServiceConfig

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  start = time.monotonic()
  if args.checkpoint:
    from dsocr_jax.checkpoint.load import load_model
    loaded = load_model(args.checkpoint, dtype=dtype)
    if loaded.tokenizer_path is None:
      raise ValueError(f"checkpoint: {args.checkpoint} has no tokenizer.json")
    model, tokenizer = loaded.model, Tokenizer.from_checkpoint(os.path.dirname(loaded.tokenizer_path))
    name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
    root = os.path.abspath(args.checkpoint)
    log.info("loaded %s in %.1f s", loaded.source, time.monotonic() - start)
  else:
    model, _, tokenizer = default_model.build_default_model(dtype=dtype)
    name, root = args.served_model_name or default_model.MODEL_ID, default_model.DESCRIPTION
    log.warning("no --checkpoint: serving the %s; its answers are random text", default_model.DESCRIPTION)
  if args.mesh:
    from dsocr_jax import sharding
    mesh = sharding.mesh_from_args(args)
    sharding.distribute(model, mesh)
    log.info("mesh: %s", sharding.mesh_description(mesh))
  engine = Engine(model, tokenizer, max_slots=args.max_batch, max_seq_len=args.max_seq_len,
                  prefill_buckets=args.prefill_buckets, max_queue=max(64, 8 * args.max_pending),
                  dtype=dtype)
  config = ServiceConfig(default_mode=args.default_mode, default_max_crops=args.max_crops,
                         max_image_pixels=args.max_image_pixels,
                         fetch=FetchLimits(max_bytes=args.max_image_bytes, timeout_s=args.image_fetch_timeout))
  service = OCRService(model, tokenizer, engine, model_name=name, model_root=root, config=config)
  service.start(vision_modes=args.warmup_modes)
  return service


class DeferredBackend:
  """Stands in for the service while it loads, so that the port (and /health) is up during warm-up."""

  def __init__(self, model_name: str, model_root: str):
    self.model_name, self.model_root, self.max_slots = model_name, model_root, 0
    self.service = None

  def attach(self, service) -> None:
    self.model_name, self.model_root, self.max_slots = service.model_name, service.model_root, service.max_slots
    self.service = service

  def is_ready(self) -> bool:
    return self.service is not None and self.service.is_ready()

  async def prepare(self, req):
    return await self.service.prepare(req)

  def generate(self, prepared, req, index):
    return self.service.generate(prepared, req, index)

  def active_slots(self) -> int:
    return 0 if self.service is None else self.service.active_slots()

  def queue_depth(self) -> int:
    return 0 if self.service is None else self.service.queue_depth()


class DrainingServer(uvicorn.Server):
  """uvicorn, but the first SIGTERM drains (see the module docstring) instead of closing the socket at once."""

  def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float):
    super().__init__(config)
    self.state, self.drain_timeout_s = state, drain_timeout_s
    self.loop: asyncio.AbstractEventLoop | None = None
    self.failure: BaseException | None = None

  async def startup(self, sockets=None) -> None:
    self.loop = asyncio.get_running_loop()
    await super().startup(sockets)

  def handle_exit(self, sig, frame) -> None:
    if sig == signal.SIGTERM and not self.state.draining and self.loop is not None:
      # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and the exit code would
      # be -15 instead of 0.
      self.state.draining = True
      self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain()))
      return
    super().handle_exit(sig, frame)

  async def _drain(self) -> None:
    log.info("SIGTERM: draining %d in-flight request(s) (at most %.0f s)", self.state.in_flight,
             self.drain_timeout_s)
    if not await self.state.wait_idle(self.drain_timeout_s):
      log.warning("drain timeout: %d request(s) still in flight are cut off", self.state.in_flight)
    self.should_exit = True

  def fail(self, error: BaseException) -> None:
    self.failure = error
    self.should_exit = True


def main(argv=None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  from serve import default_model
  name = args.served_model_name or (os.path.basename(os.path.normpath(args.checkpoint)) if args.checkpoint
                                    else default_model.MODEL_ID)
  backend = DeferredBackend(name, args.checkpoint or default_model.DESCRIPTION)
  app = create_app(backend, ServerSettings(api_key=args.api_key, max_pending=args.max_pending))
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                          timeout_graceful_shutdown=5, lifespan="off")
  server = DrainingServer(config, app.state.server, args.drain_timeout)

  def load():
    try:
      backend.attach(build_service(args))
      log.info("ready: serving %s on http://%s:%d", backend.model_name, args.host, args.port)
    except BaseException as e:  # one readable line, then the server exits non-zero
      log.error("startup failed: %s", e, exc_info=not isinstance(e, ValueError))
      server.fail(e)

  threading.Thread(target=load, name="dsocr-load", daemon=True).start()
  try:
    server.run()
  finally:
    if backend.service is not None:
      backend.service.close()
  if server.failure is not None:
    print(f"error: {server.failure}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
