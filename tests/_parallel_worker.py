"""Subprocess worker for the data-parallel tests (JAX must start with forced CPU devices).

  python tests/_parallel_worker.py <task> <json args>

The parent sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before
this process imports JAX. The last stdout line is a JSON result.

Tasks:
  grads: one batch's loss and gradients, 1 device vs the mesh (global and
    local mining), plus a few full train steps; writes ``<out>.npz``.
  run: ``triplet.run`` (optionally under ``jax.distributed``), then a digest
    of this process's copy of the final parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Smaller than the single-device tests' TINY (one stage): compile time dominates here.
TINY = dict(
    data="synthetic", synthetic_identities=12, synthetic_images=6, num_holdout=4,
    image_size=[24, 24], crop_size=[20, 20], P=4, K=3, stem_width=8, widths=[8],
    depths=[1], embedding_dim=16, num_steps=8, warmup_steps=2, log_every=2,
    checkpoint_every=2, eval_batch_size=16)


def _flat(tree):
  import jax
  import numpy as np
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def task_grads(args):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxface import parallel
  from jaxface.train import step as step_lib
  from jaxface.train.config import TripletConfig

  cfg = TripletConfig(**{**TINY, **args["config"]})
  n = args["devices"]
  mesh = parallel.make_mesh(n)
  rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  nc = cfg.P if cfg.cls_weight > 0 else 0  # CosFace classes: the batch's labels 0..P-1
  graphdef, tx, state = step_lib.init_state(cfg, num_classes=nc)
  rng = np.random.default_rng(args.get("seed", 0))
  b = cfg.P * cfg.K
  images = rng.integers(0, 256, (b, *cfg.image_size, cfg.channels), dtype=np.uint8)
  labels = np.repeat(np.arange(cfg.P, dtype=np.int32), cfg.K)
  x = jnp.asarray(images[:, :cfg.crop_size[0], :cfg.crop_size[1]], jnp.float32) / 255.0
  out = {}

  trainable = (state["params"], state["cls"]) if "cls" in state else state["params"]

  jitted = {}

  def grads(c, m, xx, ll):
    key = (c.mining, m is None)
    if key not in jitted:  # one compile per variant (the shards share one)
      f = step_lib.make_grad_fn(graphdef, c.model, c.loss, m)
      jitted[key] = jax.jit(f) if m is None else jax.jit(f, in_shardings=(rep, rep, rows, rows))
    loss, aux, new_rest, emb, g = jitted[key](trainable, state["rest"], xx, ll)
    return float(loss), _flat(g), _flat(new_rest)

  one = grads(cfg, None, x, labels)
  glob = grads(cfg, mesh, x, labels)
  out["single_loss"], out["global_loss"] = one[0], glob[0]
  for i, (a, c) in enumerate(zip(one[1], glob[1])):
    out[f"single_grad{i}"], out[f"global_grad{i}"] = a, c
  if cfg.P % n == 0:
    local_cfg = TripletConfig(**{**cfg.to_dict(), "mining": "local"})
    loc = grads(local_cfg, mesh, x, labels)
    per = b // n
    shards = [grads(local_cfg, None, x[i * per:(i + 1) * per], labels[i * per:(i + 1) * per])
              for i in range(n)]
    out["local_loss"] = loc[0]
    out["shard_losses"] = np.array([s[0] for s in shards])
    for i, g in enumerate(loc[1]):
      out[f"local_grad{i}"] = g
      out[f"shard_grad{i}"] = np.stack([s[1][i] for s in shards])
    for i, r in enumerate(loc[2]):
      out[f"local_rest{i}"] = r
      out[f"shard_rest{i}"] = np.stack([s[2][i] for s in shards])

  # A few full steps (augmentation on, state donated) on both paths.
  steps = args.get("steps", 0)
  if steps:
    batch = {"images": images, "labels": labels}
    s1 = step_lib.init_state(cfg, num_classes=nc)[2]
    step1 = step_lib.make_train_step(graphdef, tx, cfg)
    sn = parallel.replicate(step_lib.init_state(cfg, num_classes=nc)[2], mesh)
    stepn = step_lib.make_train_step(graphdef, tx, cfg, mesh)
    gbatch = parallel.global_batch(mesh, batch, b)
    for _ in range(steps):
      s1, m1 = step1(s1, batch)
      sn, mn = stepn(sn, gbatch)
    out["steps_single_loss"], out["steps_mesh_loss"] = float(m1["train/loss"]), float(mn["train/loss"])
    for i, (a, c) in enumerate(zip(_flat(s1["params"]), _flat(sn["params"]))):
      out[f"steps_single{i}"], out[f"steps_mesh{i}"] = a, c
    out["compiles"] = stepn._cache_size()
    out["param_sharding_replicated"] = all(
        x.sharding.is_fully_replicated and len(x.sharding.device_set) == n
        for x in jax.tree.leaves(sn["params"]))
  np.savez(args["out"], **out)
  return {"ok": True}


def task_run(args):
  from jaxface import parallel
  parallel.initialize(args.get("distributed", "off"),
                      coordinator_address=args.get("coordinator_address", ""),
                      num_processes=args.get("num_processes", 0),
                      process_id=args.get("process_id", -1), timeout_s=60)
  import jax
  from flax import nnx

  from jaxface.train import triplet
  from jaxface.train.config import TripletConfig

  cfg = TripletConfig(**{**TINY, **args["config"]})
  lines = []
  printer = lambda s: (lines.append(s), print(s, flush=True))
  if args.get("stop_after"):
    # Stop as a pre-empted job would, then resume in the same processes.
    triplet.run(cfg, args["workdir"], stop_after=args["stop_after"], printer=printer)
  res = triplet.run(cfg, args["workdir"], printer=printer)
  mesh = triplet.resolve_mesh(cfg)
  model, _ = triplet.load_params(args["workdir"], mesh=mesh)
  leaves = _flat(parallel.to_local(nnx.state(model)))
  digest = hashlib.sha256(b"".join(x.tobytes() for x in leaves)).hexdigest()
  rows = parallel.process_rows(mesh, cfg.P * cfg.K) if mesh is not None else slice(None)
  return {"process": jax.process_index(), "rows": [rows.start, rows.stop], "processes": jax.process_count(),
          "devices": jax.device_count(), "digest": digest, "printed": len(lines),
          "accuracy": res.get("eval/accuracy"),
          "resumed": any("resumed from" in l for l in lines)}


if __name__ == "__main__":
  task, arg = sys.argv[1], json.loads(sys.argv[2])
  result = {"grads": task_grads, "run": task_run}[task](arg)
  print(json.dumps(result), flush=True)
