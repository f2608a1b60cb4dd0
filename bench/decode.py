"""Decode throughput of the real-size decoder through the engine, against PyTorch and the memory floor.

  python bench/decode.py [--quick] [--steps 32] [--torch-dtypes bfloat16,float32]

Random weights (fast numpy generator), real sizes (`DecoderConfig()` defaults). One process, phases run one
after the other so that only one model is in memory at a time (f32 real size is 11.7 GB):
1. memory bandwidth (f32 matrix-vector, numpy) and the CPU dtype / matmul-layout probes for decode shapes;
2. JAX engine, f32 weights: prefill of a 913-token prompt (batch 1), then greedy decode at batch 1, 8 and 32
   (engine slots = batch; max_seq_len 1024 for all three, and since a decode step attends over the whole
   preallocated cache, its cost equals that of a 913-token context whatever the prompt: batches 8 and 32 use
   16-token prompts to skip 40 prefills);
3. PyTorch (`transformers` DeepseekOcr2 text model configured as the DeepSeek-OCR decoder, perf-notes), its KV
   cache and greedy argmax, 2 threads, at batch 1 and 8 in each dtype of --torch-dtypes (fastest reported; a
   64-token prompt: the attention over 913 positions would add ~5% to its per-token weight traffic).
floor_tok_s_b1 = measured bandwidth / bytes of the weights one token reads (active experts only).
JSON line last; /proc/loadavg is logged (the machine is shared: compare within one run only).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsocr_jax.config import DecoderConfig
from dsocr_jax.generate.engine import Engine, GenerationRequest, SamplingParams
from dsocr_jax.model import params
from dsocr_jax.model.decoder import Decoder

PROMPT = 913  # a 1190x1684 page in Gundam mode (spec 5.4)
MAX_SEQ_LEN = 1024


def loadavg() -> list[str]:
  return open("/proc/loadavg").read().split()[:3]


def median_time(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def memory_bandwidth(reps: int = 7) -> float:
  """Bytes/s of an f32 matrix-vector product over a 512 MiB matrix (weight streaming, as decode does)."""
  w = np.random.default_rng(0).standard_normal((16384, 8192), np.float32)
  x = np.ones(8192, np.float32)
  w @ x
  return w.nbytes / median_time(lambda: w @ x, reps)


def active_weight_bytes(cfg: DecoderConfig, itemsize: int) -> int:
  """Weights one decode token reads: attention, layer-0 MLP, per MoE layer router + shared + top-k experts,
  lm_head and one embedding row."""
  h = cfg.hidden_size
  attn = 2 * h * cfg.num_attention_heads * cfg.head_dim + 2 * h * cfg.num_key_value_heads * cfg.head_dim
  per_layer = []
  for i in range(cfg.num_hidden_layers):
    if cfg.is_moe_layer(i):
      mlp = h * cfg.n_routed_experts + 3 * h * cfg.shared_intermediate_size
      mlp += cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size
    else:
      mlp = 3 * h * cfg.intermediate_size
    per_layer.append(attn + mlp + 2 * h)
  return (sum(per_layer) + h * cfg.vocab_size + 2 * h) * itemsize


def probe_matvec(shape_in: int, shape_out: int, batches=(1, 8, 32), reps: int = 7) -> dict:
  """ms for x @ W[in,out] (our Dense) vs (Wt @ x.T).T with Wt [out,in], and x @ W in bf16, per batch size."""
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.standard_normal((shape_in, shape_out), np.float32))
  wt = jnp.asarray(np.ascontiguousarray(np.asarray(w).T))
  wb = w.astype(jnp.bfloat16)
  in_out = jax.jit(lambda x, w: x @ w)
  out_in = jax.jit(lambda x, wt: (wt @ x.T).T)
  out = {}
  for b in batches:
    x = jnp.asarray(rng.standard_normal((b, shape_in), np.float32))
    xb = x.astype(jnp.bfloat16)
    for name, fn, args in (("f32_x_at_w", in_out, (x, w)), ("f32_wt_at_xt", out_in, (x, wt)),
                           ("bf16_x_at_w", in_out, (xb, wb))):
      fn(*args).block_until_ready()
      out[f"{name}_b{b}_ms"] = round(1e3 * median_time(lambda: fn(*args).block_until_ready(), reps), 3)
  return out


def build_decoder(cfg: DecoderConfig, dtype) -> Decoder:
  """Random weights, one leaf at a time (peak memory = the model + one leaf)."""
  ctor = lambda: Decoder(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(ctor), nnx.Param))
  rng = np.random.default_rng(0)

  def fill(x):
    a = rng.standard_normal(x.shape, np.float32)
    a *= 0.02
    return jnp.asarray(a, dtype)

  return params.from_tree(ctor, jax.tree.map(fill, abstract))


def jax_decode(decoder: Decoder, batch: int, prompt: int, steps: int, measure_prefill: bool) -> dict:
  eng = Engine(decoder, None, max_slots=batch, max_seq_len=MAX_SEQ_LEN, prefill_buckets=(prompt,), max_queue=batch)
  t0 = time.perf_counter()
  eng.warmup()
  compile_s = time.perf_counter() - t0
  rng = np.random.default_rng(batch)
  prompt_ids = lambda: rng.integers(3, decoder.cfg.vocab_size, prompt)
  greedy = SamplingParams(max_tokens=steps + 1, ignore_eos=True, ngram_size=0, repetition_stop=False)
  out = dict(compile_s=round(compile_s, 1))
  with eng:
    if measure_prefill:
      before = eng.stats().prefill_seconds
      eng.generate(GenerationRequest(prompt_ids(), dataclasses.replace(greedy, max_tokens=1)))
      out["prefill_s"] = round(eng.stats().prefill_seconds - before, 3)
    s0 = eng.stats()
    handles = [eng.submit(GenerationRequest(prompt_ids(), greedy)) for _ in range(batch)]
    for h in handles:
      assert h.result().completion_tokens == steps + 1
    s1 = eng.stats()
  decode_tokens = (s1.tokens_generated - s0.tokens_generated) - batch  # the first token of each is prefill's
  out["decode_steps"] = s1.decode_steps - s0.decode_steps
  out["tok_s"] = round(decode_tokens / (s1.decode_seconds - s0.decode_seconds), 3)
  out["ms_per_step"] = round(1e3 * (s1.decode_seconds - s0.decode_seconds) / out["decode_steps"], 1)
  del eng
  gc.collect()
  return out


def torch_decode(cfg: DecoderConfig, dtype_name: str, batches: tuple[int, ...], steps: int) -> dict:
  import torch
  from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig
  from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2TextModel
  torch.set_num_threads(2)
  dtype = getattr(torch, dtype_name)
  tcfg = DeepseekOcr2TextConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
      num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
      intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
      n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
      num_experts_per_tok=cfg.num_experts_per_tok, rms_norm_eps=cfg.rms_norm_eps,
      max_position_embeddings=cfg.max_position_embeddings, routed_scaling_factor=cfg.routed_scaling_factor,
      mlp_layer_types=["dense"] * cfg.first_k_dense_replace + ["sparse"] * (cfg.num_hidden_layers -
                                                                            cfg.first_k_dense_replace),
      bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
  with torch.device("meta"):
    model = DeepseekOcr2TextModel(tcfg)
    head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
  model, head = model.to_empty(device="cpu").to(dtype), head.to_empty(device="cpu").to(dtype)
  model.rotary_emb = type(model.rotary_emb)(tcfg)  # its inv_freq buffer was created on the meta device
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in list(model.parameters()) + list(head.parameters()):
      p.normal_(0.0, 0.02, generator=gen)
    for name, p in model.named_parameters():
      if "norm" in name:
        p.fill_(1.0)
  model.eval()
  out = {}
  with torch.inference_mode():
    for b in batches:
      ids = torch.randint(3, cfg.vocab_size, (b, 64), generator=gen)
      o = model(input_ids=ids, use_cache=True)
      cache = o.past_key_values
      tok = head(o.last_hidden_state[:, -1:]).argmax(-1)
      times = []
      for i in range(steps + 2):
        t0 = time.perf_counter()
        o = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = head(o.last_hidden_state).argmax(-1)
        times.append(time.perf_counter() - t0)
      per_step = float(np.median(times[2:]))
      out[f"b{b}"] = dict(ms_per_step=round(1e3 * per_step, 1), tok_s=round(b / per_step, 3))
  del model, head
  gc.collect()
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="fewer decode steps, torch in bfloat16 only (~10 min)")
  ap.add_argument("--steps", type=int, default=None, help="decode steps per measurement")
  ap.add_argument("--torch-dtypes", default=None, help="comma list of bfloat16,float32")
  args = ap.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  steps = args.steps or (12 if args.quick else 32)
  torch_dtypes = (args.torch_dtypes or ("bfloat16" if args.quick else "bfloat16,float32")).split(",")
  cfg = DecoderConfig()
  result = dict(bench="decode", quick=args.quick, steps=steps, prompt=PROMPT, max_seq_len=MAX_SEQ_LEN,
                loadavg_start=loadavg())

  bw = memory_bandwidth()
  result["bandwidth_gb_s"] = round(bw / 1e9, 2)
  result["active_weight_gb_f32"] = round(active_weight_bytes(cfg, 4) / 1e9, 3)
  result["floor_tok_s_b1"] = round(bw / active_weight_bytes(cfg, 4), 3)
  # dtype and layout for decode shapes: a routed expert's up-projection and the lm_head.
  result["probe_expert_1280x896"] = probe_matvec(cfg.hidden_size, cfg.moe_intermediate_size)
  result["probe_lm_head_1280x129280"] = probe_matvec(cfg.hidden_size, cfg.vocab_size, batches=(1, 8), reps=3)
  print(json.dumps(result), flush=True)
  probe = result["probe_expert_1280x896"]
  dtype = jnp.float32 if probe["f32_x_at_w_b1_ms"] <= probe["bf16_x_at_w_b1_ms"] else jnp.bfloat16
  result["jax_dtype"] = jnp.dtype(dtype).name

  t0 = time.perf_counter()
  decoder = build_decoder(cfg, dtype)
  result["jax_build_s"] = round(time.perf_counter() - t0, 1)
  for b in (1, 8, 32):
    r = jax_decode(decoder, b, PROMPT if b == 1 else 16, steps if b < 32 else max(4, steps // 2), b == 1)
    result[f"jax_b{b}"] = r
    result[f"jax_tok_s_b{b}"] = r["tok_s"]
    print(json.dumps({f"jax_b{b}": r}), flush=True)
  result["jax_prefill_913_s"] = result["jax_b1"]["prefill_s"]
  del decoder
  gc.collect()
  jax.clear_caches()

  best = {1: 0.0, 8: 0.0}
  for name in torch_dtypes:
    r = torch_decode(cfg, name, (1, 8), max(4, steps // 2))
    result[f"torch_{name}"] = r
    print(json.dumps({f"torch_{name}": r}), flush=True)
    for b in best:
      best[b] = max(best[b], r[f"b{b}"]["tok_s"])
  result["torch_tok_s_b1"], result["torch_tok_s_b8"] = best[1], best[8]
  result["ratio_b1"] = round(result["jax_tok_s_b1"] / best[1], 3)  # > 1: JAX faster
  result["ratio_b8"] = round(result["jax_tok_s_b8"] / best[8], 3)
  result["jax_b1_over_floor"] = round(result["jax_tok_s_b1"] / result["floor_tok_s_b1"], 3)
  result["loadavg_end"] = loadavg()
  print(json.dumps(result))


if __name__ == "__main__":
  main()
