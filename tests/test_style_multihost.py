"""``python -m experiments.nst`` under jax.distributed: 2 processes on 127.0.0.1 (CPU).

Each process has 2 forced host devices, so the 4-image batch is split over 4
devices of 2 processes (1 image each). The reference is one process with 4
forced devices (the same per-device program). Which process writes which file
is recorded by an audit hook (``sys.addaudithook`` in a ``sitecustomize.py``
put on the children's PYTHONPATH): the command run is still exactly
``python -m experiments.nst``.
"""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["0_scene", "1_checker", "2_checker", "3_scene"]
# Two convolutions, 8 then 16 px, 3 + 3 steps: each process compiles in a second or two.
ARGS = ["--content=builtin:scene,builtin:checker,builtin:checker,builtin:scene", "--size=16",
        "--num_scales=2", "--steps=3,3", "--content_layer=relu1_2", "--style_layers=relu1_1,relu1_2",
        "--beta=1e4", "--tv_weight=1e-2", "--init=content_noise", "--seed=3", "--log_every=1",
        "--checkpoint_every=4", "--snapshot_every=3", "--num_devices=0"]

# Logs every file this process opens for writing or renames into place, one path a line.
SITECUSTOMIZE = textwrap.dedent("""\
    import os, sys
    _log = os.environ.get("NST_TEST_WRITES")
    if _log:
      _fd = os.open(_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
      _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

      def _hook(event, args):
        path = None
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
          mode, flags = args[1], args[2]
          if (mode and any(c in mode for c in "wax+")) or (not mode and flags & _WRITE):
            path = args[0]
        elif event == "os.rename":
          path = args[1]
        if path is not None:
          os.write(_fd, (os.fsdecode(os.fspath(path)) + "\\n").encode())

      sys.addaudithook(_hook)
    """)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(tmp_path, devices, writes=None):
  hooks = tmp_path / "hooks"
  hooks.mkdir(exist_ok=True)
  (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
  env = {k: v for k, v in os.environ.items() if k not in ("JAXFACE_VGG19", "NST_TEST_WRITES")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             JAXFACE_CACHE=str(tmp_path / "cache"),  # random VGG weights, never the developer's
             PYTHONPATH=os.pathsep.join([str(hooks), REPO, os.environ.get("PYTHONPATH", "")]))
  if writes:
    env["NST_TEST_WRITES"] = str(writes)
  return env


def _start(args, env):
  return subprocess.Popen([sys.executable, "-m", "experiments.nst", *ARGS, *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pair(tmp_path, workdir, extra=()):
  port = _free_port()
  return [_start([f"--workdir={workdir}", "--distributed=on", f"--coordinator_address=127.0.0.1:{port}",
                  "--num_processes=2", f"--process_id={pid}", *extra],
                 _env(tmp_path, 2, tmp_path / f"writes{pid}.txt")) for pid in range(2)]


def _finish(procs, timeout=180):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  return outs  # (stdout, stderr) of each


def _said(text):
  # gloo's C++ code prints its connection lines to stdout in every process, from
  # several threads, so one line can arrive split ("[Gloo] Rank 1" + " is connected
  # to 3 peer ranks..."); JAX's C++ logs (glog: "I1207 12:00:00.000 ...") go to
  # stderr beside the progress lines.
  return [l for l in text.splitlines() if l.strip() and "[Gloo]" not in l
          and not re.search(r"connected to \d+ peer ranks", l)
          and not re.match(r"[IWEF]\d{4} \d\d:\d\d:\d\d", l)]


def _written(tmp_path, pid, workdir):
  path = tmp_path / f"writes{pid}.txt"
  lines = path.read_text().splitlines() if path.exists() else []
  # Orbax's own files: every process takes part in checkpointing by design.
  return {os.path.relpath(l, workdir) for l in lines
          if os.path.abspath(l).startswith(str(workdir) + os.sep)
          and not os.path.abspath(l).startswith(str(workdir / "checkpoints"))}


def test_two_processes_stylise_like_one_process_resume_and_only_process_0_writes(tmp_path):
  run, ref = tmp_path / "run", tmp_path / "ref"
  # Reference (1 process, 4 devices) alongside the first, stopped, 2-process run.
  procs = [_start([f"--workdir={ref}"], _env(tmp_path, 4))] + _pair(tmp_path, run, ["--stop_after=4"])
  (_, ref_err), *outs = _finish(procs)
  # Progress goes to stderr (process 0's only); stdout holds results: none for a stopped run.
  assert "batch sharded over 4 cpu devices" in ref_err
  assert _said(outs[0][0]) == [] and _said(outs[1][0]) == []
  said0, said1 = _said(outs[0][1]), _said(outs[1][1])
  assert any("batch sharded over 4 cpu devices in 2 processes" in l for l in said0), said0
  assert sum(l.startswith("scale ") for l in said0) == 4
  assert said0[-1] == "stopped at step 4 (stop_after); resume with the same workdir"
  assert said1 == []
  assert not any(run.glob("*_stylized.png"))
  assert sorted(os.listdir(run / "snapshots")) == [f"step000003_{n}.png" for n in NAMES]

  outs = _finish(_pair(tmp_path, run))          # the same command again: resumes at step 4
  assert _said(outs[0][0]) == [str(run / f"{n}_stylized.png") for n in NAMES]
  assert _said(outs[1][0]) == []
  said0, said1 = _said(outs[0][1]), _said(outs[1][1])
  assert any(l.startswith(f"resumed from {run / 'checkpoints' / '4'} (scale 2/2)") for l in said0)
  assert [l.split("step")[1].split("/")[0].strip() for l in said0 if l.startswith("scale ")] == ["5", "6"]
  assert said0[-1].startswith("done in ") and said1 == []

  # Process 0 wrote every output file; process 1 none (outside orbax's checkpoints/).
  pngs = {f"{n}_stylized.png" for n in NAMES}
  snaps = {f"snapshots/step00000{s}_{n}.png" for s in (3, 6) for n in NAMES}
  w0, w1 = _written(tmp_path, 0, run), _written(tmp_path, 1, run)
  assert pngs | snaps | {"config.json", "train_log.jsonl", "result.json"} <= w0, w0
  assert w1 == set()
  assert [r["step"] for r in map(json.loads, open(run / "train_log.jsonl"))] == [1, 2, 3, 4, 5, 6]

  # The same images as one process on 4 devices: each device runs the same
  # program on the same image, so measured equal; PNG rounding may differ by 1
  # level if a pixel lands on a rounding boundary (the stated tolerance).
  for n in NAMES:
    a = np.asarray(Image.open(run / f"{n}_stylized.png"), np.int16)
    b = np.asarray(Image.open(ref / f"{n}_stylized.png"), np.int16)
    assert a.shape == (16, 16, 3) and np.abs(a - b).max() <= 1, n
  final = json.load(open(run / "result.json"))["final"]
  ref_final = json.load(open(ref / "result.json"))["final"]
  assert final.keys() == ref_final.keys()
  for k in final:
    assert final[k] == pytest.approx(ref_final[k], rel=1e-5), k
  assert json.load(open(run / "config.json"))["process_id"] == 0


def test_multi_process_needs_every_device_and_config_checks_distributed(monkeypatch):
  import jax

  from jaxface.style import sharding
  from jaxface.style.config import RESUMABLE_CHANGES, NSTConfig
  with pytest.raises(ValueError, match="distributed='everywhere': must be one of off, on, auto"):
    NSTConfig(distributed="everywhere").validate()
  assert {"distributed", "coordinator_address", "num_processes", "process_id"} <= set(RESUMABLE_CHANGES)
  # A subset of the devices cannot hold a multi-process batch (checked before any compute).
  dev = jax.devices()[0]
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "devices", lambda *a: [dev, dev])  # as if 2 devices in 2 processes
  with pytest.raises(ValueError, match="num_devices=1: a run of 2 processes splits the batch "
                                       "over all 2 devices of all processes; pass num_devices=0"):
    sharding.make_mesh(1, 4)


def test_place_and_to_host_on_one_process_are_device_put_and_device_get():
  import jax
  import jax.numpy as jnp

  from jaxface.parallel import mesh as mesh_lib
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  x = np.arange(12, dtype=np.float32).reshape(4, 3)
  placed = mesh_lib.place(x, mesh_lib.batch_sharding(mesh))
  assert placed.sharding == mesh_lib.batch_sharding(mesh)
  np.testing.assert_array_equal(mesh_lib.to_host(placed), x)
  np.testing.assert_array_equal(mesh_lib.to_host(jnp.asarray(x) * 2), 2 * x)
