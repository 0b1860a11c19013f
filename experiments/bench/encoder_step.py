r"""Benchmark: encoder train step (forward, triplet loss, backward, AdamW) images/s.

Compares, in the same run and on the same batch shapes:
  * jaxface's jitted ``train_step`` (default XLA flags),
  * the same with ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` (empty
    value), which on jaxlib 0.10 CPU changes how convolutions are fused/threaded,
  * an equivalent PyTorch CPU step (same ResNet, BatchNorm, batch-all triplet
    loss, AdamW), when torch is installed (``pip install torch==2.13.0``).

Each JAX variant runs in its own subprocess because XLA_FLAGS is read once at
start-up.

  python -m experiments.bench.encoder_step [--steps=20] [--config=demo|att_orl]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from experiments.flagutil import YNN_FLAG

flags.DEFINE_integer("steps", 20, "timed steps per variant (after 3 warm-up steps)")
flags.DEFINE_enum("config", "demo", ["demo", "att_orl", "tiny"],
                  "batch/model shapes to time (tiny: a few-second smoke run for the tests)")
flags.DEFINE_string("worker", "", "internal: run one variant and print JSON")
FLAGS = flags.FLAGS



def _config(name: str):
  from jaxface.train.config import TripletConfig
  if name == "demo":
    return TripletConfig(stem_stride=2, P=16, K=4, image_size=(64, 64), crop_size=(56, 56), channels=3)
  if name == "tiny":
    return TripletConfig(stem_stride=2, P=4, K=2, image_size=(32, 32), crop_size=(28, 28), channels=3,
                         stem_width=8, widths=(8, 16), depths=(1, 1), embedding_dim=16)
  return TripletConfig(data="folder", data_path="x", stem_stride=1, P=15, K=5, image_size=(64, 52),
                       crop_size=(56, 48), channels=1)


def _jax_worker(name: str, steps: int) -> dict:
  import jax
  import numpy as np

  from jaxface.train import triplet
  cfg = _config(name)
  graphdef, tx, state = triplet.init_state(cfg)
  step_fn = triplet.make_train_step(graphdef, tx, cfg)
  rng = np.random.default_rng(0)
  b = cfg.P * cfg.K
  batch = {"images": rng.integers(0, 256, (b, *cfg.image_size, cfg.channels), dtype=np.uint8),
           "labels": np.repeat(np.arange(cfg.P, dtype=np.int32), cfg.K)}
  for _ in range(3):
    state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return {"median_s": float(np.median(times)), "batch": b}


def _torch_step(name: str, steps: int) -> dict | None:
  try:
    import torch
    from torch import nn
  except ImportError:
    return None
  import numpy as np
  cfg = _config(name)
  torch.manual_seed(0)

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.b1 = nn.BatchNorm2d(cout)
      self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.b2 = nn.BatchNorm2d(cout)
      self.proj = None
      if stride != 1 or cin != cout:
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.b1(self.c1(x)))
      y = self.b2(self.c2(y))
      return torch.relu(y + (x if self.proj is None else self.proj(x)))

  layers = [nn.Conv2d(cfg.channels, cfg.stem_width, 3, cfg.stem_stride, 1, bias=False),
            nn.BatchNorm2d(cfg.stem_width), nn.ReLU()]
  cin = cfg.stem_width
  for s, (w, d) in enumerate(zip(cfg.widths, cfg.depths)):
    for i in range(d):
      layers.append(Block(cin, w, 2 if (s > 0 and i == 0) else 1))
      cin = w
  body = nn.Sequential(*layers)
  head = nn.Linear(cin, cfg.embedding_dim)
  params = list(body.parameters()) + list(head.parameters())
  opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
  b = cfg.P * cfg.K
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.integers(0, 256, (b, cfg.channels, *cfg.image_size), dtype=np.uint8))
  labels = torch.arange(cfg.P).repeat_interleave(cfg.K)
  ch, cw = cfg.crop_size

  def step():
    x = images[:, :, :ch, :cw].float() / 255.0 - 0.5
    e = head(body(x).mean(dim=(2, 3)))
    e = e / e.norm(dim=1, keepdim=True)
    d = torch.cdist(e, e).pow(2)
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(b, dtype=torch.bool)
    neg = ~same
    loss3 = torch.relu(d[:, :, None] - d[:, None, :] + cfg.margin)
    valid = pos[:, :, None] & neg[:, None, :]
    active = (loss3 > 0) & valid
    loss = (loss3 * active).sum() / active.sum().clamp(min=1)
    opt.zero_grad()
    loss.backward()
    opt.step()

  for _ in range(3):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return {"median_s": float(np.median(times)), "batch": b, "threads": torch.get_num_threads()}


def _run_worker(variant: str, name: str, steps: int) -> dict:
  env = dict(os.environ, JAXFACE_NO_XLA_TUNING="1")
  if variant == "ynn":
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + YNN_FLAG).strip()
  else:
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_cpu_experimental_ynn_fusion_type"))
  out = subprocess.run([sys.executable, "-m", "experiments.bench.encoder_step", f"--worker={variant}",
                        f"--config={name}", f"--steps={steps}"], env=env, capture_output=True,
                       text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.worker:
    print(json.dumps(_jax_worker(FLAGS.config, FLAGS.steps)))
    return
  print(f"encoder train step, config={FLAGS.config}, {FLAGS.steps} timed steps, median per step")
  rows = [("jax (default XLA flags)", _run_worker("default", FLAGS.config, FLAGS.steps)),
          (f"jax XLA_FLAGS={YNN_FLAG}", _run_worker("ynn", FLAGS.config, FLAGS.steps))]
  torch_row = _torch_step(FLAGS.config, FLAGS.steps)
  if torch_row is None:
    print("torch not installed: `pip install torch==2.13.0` (CPU wheel) to compare against PyTorch")
  else:
    rows.append((f"pytorch eager ({torch_row['threads']} threads)", torch_row))
  ref = torch_row["median_s"] if torch_row else rows[0][1]["median_s"]
  print(f"{'implementation':44s} {'ms/step':>9s} {'img/s':>9s} {'time / ' + ('torch' if torch_row else 'jax'):>14s}")
  for name, r in rows:
    print(f"{name:44s} {1e3 * r['median_s']:9.1f} {r['batch'] / r['median_s']:9.1f} "
          f"{r['median_s'] / ref:14.2f}")


if __name__ == "__main__":
  from experiments import flagutil as _flagutil
  app.run(main, flags_parser=_flagutil.parse_flags_exit2)
