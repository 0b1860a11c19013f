"""Tests for jaxface.train.config: the nested config, its checks, old flat configs, resume rules."""

import dataclasses
import json
import os

import pytest

from jaxface import checkpointing
from jaxface.data.build import DataConfig
from jaxface.train import config as config_lib
from jaxface.train.config import (
  AugmentConfig,
  EvalConfig,
  LossConfig,
  ModelConfig,
  OptimConfig,
  RuntimeConfig,
  TripletConfig,
)

HERE = os.path.dirname(os.path.abspath(__file__))
# config.json of a run of the flat TripletConfig (before the groups), written by
# python -m experiments.triplet --flagfile=experiments/configs/triplet_demo_tiny.flags
FLAT_V1 = os.path.join(HERE, "data", "triplet_config_flat_v1.json")

# The keys the flat config let a resumed run change (its hand-kept RESUMABLE_CHANGES).
OLD_RESUMABLE_CHANGES = (
    "num_steps", "log_every", "checkpoint_every", "eval_every", "eval_batch_size", "max_to_keep",
    "roc_png", "eval_flip", "eval_crops", "fisher_weight", "fisher_pca", "score_norm",
    "score_norm_top_k", "score_norm_cohort", "num_devices", "distributed", "coordinator_address",
    "num_processes", "process_id")


def _flat_v1() -> dict:
  with open(FLAT_V1) as f:
    return json.load(f)


def test_a_flat_config_json_of_the_old_trainer_loads_into_the_groups():
  flat = _flat_v1()
  cfg = TripletConfig.from_dict(flat)
  assert len(flat) == 70 and cfg.to_flat() == flat
  # Every old key lands in its group with its value (the data kind is data.kind, flag --data).
  for name, value in flat.items():
    if name == "seed":
      assert cfg.seed == value
      continue
    group, field = config_lib.FLAT[name]
    got = getattr(getattr(cfg, group), field)
    assert (list(got) if isinstance(got, tuple) else got) == value, name
  assert (cfg.data.kind, cfg.data.P, cfg.loss.strategy, cfg.model.widths, cfg.runtime.num_steps) == \
      ("synthetic", 4, "all_active", (8, 16), 6)
  # Nested round trip through JSON.
  assert TripletConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert set(cfg.to_dict()) == {"seed", "data", "augment", "model", "loss", "optim", "eval", "runtime"}


def test_old_and_new_configs_compare_for_resume_by_their_groups():
  flat = _flat_v1()
  cfg = TripletConfig.from_dict(flat)
  cfg.check_resumable(flat)            # an old flat checkpoint, same settings
  cfg.check_resumable(cfg.to_dict())   # a new nested one
  changed = dataclasses.replace(cfg, num_steps=50, log_every=5, eval_crops=5, score_norm="snorm",
                                num_devices=2, eval_flip=False)
  changed.check_resumable(flat)        # eval and runtime settings may change
  for change in ({"margin": 0.3}, {"P": 5}, {"widths": (8, 32)}, {"seed": 1}, {"learning_rate": 0.1},
                 {"flip": False}, {"mining": "local"}, {"ensemble": 2}):
    other = dataclasses.replace(cfg, **change)
    name = next(iter(change))
    with pytest.raises(checkpointing.CheckpointError, match=f"{name}: saved"):
      other.check_resumable(flat)
    with pytest.raises(checkpointing.CheckpointError, match=f"{name}: saved"):
      other.check_resumable(cfg.to_dict())
  # A run saved before a setting existed compares it at its default.
  old = {k: v for k, v in flat.items() if k not in ("noise", "spatial_rank")}
  cfg.check_resumable(old)
  with pytest.raises(checkpointing.CheckpointError, match="noise: saved 0.0 vs now 0.1"):
    dataclasses.replace(cfg, noise=0.1).check_resumable(old)


def test_what_may_change_on_resume_follows_from_the_groups():
  names = TripletConfig.resumable_names()
  assert set(names) == set(OLD_RESUMABLE_CHANGES) and len(names) == len(OLD_RESUMABLE_CHANGES)
  groups = {f.name for cls in (EvalConfig, RuntimeConfig) for f in dataclasses.fields(cls)}
  assert set(names) == groups
  assert config_lib.RESUMABLE_GROUPS == ("eval", "runtime")


def test_groups_and_flat_names():
  counts = {g: len(dataclasses.fields(cls)) for g, cls in config_lib.GROUPS.items()}
  assert counts == {"data": 20, "augment": 7, "model": 10, "loss": 8, "optim": 5, "eval": 10, "runtime": 9}
  assert len(config_lib.FLAT) == sum(counts.values()) == 69  # + the seed
  cfg = TripletConfig(P=8, strategy="hard", data="folder", data_path="/x", seed=3)
  assert (cfg.P, cfg.data.P, cfg.strategy, cfg.loss.strategy, cfg.data.kind, cfg.seed) == \
      (8, 8, "hard", "hard", "folder", 3)
  # Groups as instances or dicts; flat names override the group they belong to.
  same = TripletConfig(data=dataclasses.replace(DataConfig(), P=8, kind="folder", data_path="/x"),
                       loss={"strategy": "hard"}, seed=3)
  assert same == cfg and hash(same) == hash(cfg)
  assert TripletConfig(**{**cfg.to_dict(), "P": 6}).data.P == 6
  assert dataclasses.replace(cfg, margin=0.5).loss.margin == 0.5 and cfg.loss.margin == 0.2
  # The data kind's flat name is also its group's: beside groups it is refused, not lost.
  assert cfg.replace(data="tfds", P=5).data == dataclasses.replace(cfg.data, kind="tfds", P=5)
  for bad in (lambda: dataclasses.replace(cfg, data="tfds"),
              lambda: TripletConfig(**{**cfg.to_dict(), "data": "tfds"})):
    with pytest.raises(ValueError, match="^data='tfds': the data kind cannot be given by its flat name"):
      bad()
  with pytest.raises(TypeError, match="unknown settings"):
    TripletConfig(colour="red")
  with pytest.raises(ValueError, match=r"unknown config keys: \['colour'\]"):
    TripletConfig.from_dict({"colour": "red"})
  with pytest.raises(ValueError, match=r"unknown config keys: \['colour'\]"):
    TripletConfig.from_dict({"loss": {"colour": "red"}})
  with pytest.raises(AttributeError, match="no setting 'colour'"):
    cfg.colour  # noqa: B018


@pytest.mark.parametrize("cls,changes,match", [
    (DataConfig, {"kind": "ftp"}, r"^kind='ftp': must be one of synthetic, folder, tfds"),
    (DataConfig, {"kind": "folder"}, r"^data_path='': a folder source needs its root"),
    (DataConfig, {"align": "box"}, r"^align='box': must be none or dlib"),
    (DataConfig, {"align": "dlib"}, r"^align='dlib': needs a folder source"),
    (DataConfig, {"on_bad_image": "ignore"}, r"^on_bad_image='ignore'"),
    (DataConfig, {"P": 1}, r"^P=1: a batch needs at least 2 identities"),
    (DataConfig, {"K": 1}, r"^K=1"),
    (DataConfig, {"crop_size": (80, 80)}, r"^crop_size=\(80, 80\): must not exceed"),
    (DataConfig, {"channels": 2}, r"^channels=2"),
    (DataConfig, {"num_holdout": 1}, r"^num_holdout=1"),
    (AugmentConfig, {"noise": 0.7}, r"^noise=0.7: must be in \[0, 0.5\]"),
    (AugmentConfig, {"brightness": float("nan")}, r"^brightness=nan"),
    (AugmentConfig, {"rotate": 50.0}, r"^rotate=50.0"),
    (ModelConfig, {"init": "imagenet"}, r"^init='imagenet': must be one of scratch, dlib"),
    (ModelConfig, {"ensemble": 17}, r"^ensemble=17"),
    (LossConfig, {"strategy": "nearest"}, r"^strategy='nearest': must be one of all, all_active, hard, semihard"),
    (LossConfig, {"margin": -0.1}, r"^margin=-0.1"),
    (LossConfig, {"mining": "everywhere"}, r"^mining='everywhere': must be one of global, local"),
    (LossConfig, {"cls_type": "sphereface"}, r"^cls_type='sphereface': must be cosface or arcface"),
    (OptimConfig, {"learning_rate": 0.0}, r"^learning_rate=0.0"),
    (OptimConfig, {"ema_decay": 1.0}, r"^ema_decay=1.0"),
    (EvalConfig, {"eval_crops": 3}, r"^eval_crops=3"),
    (EvalConfig, {"score_norm": "znorm"}, r"^score_norm='znorm': must be one of none, snorm"),
    (EvalConfig, {"score_norm_top_k": 50, "score_norm_cohort": 20}, r"^score_norm_top_k=50: must be <="),
    (RuntimeConfig, {"num_steps": -1}, r"^num_steps=-1"),
    (RuntimeConfig, {"log_every": 0}, r"^log_every=0"),
    (RuntimeConfig, {"distributed": "yes"}, r"^distributed='yes': must be one of off, on, auto"),
])
def test_each_group_checks_its_own_settings_and_names_the_parameter(cls, changes, match):
  cls()  # the defaults are valid
  with pytest.raises(ValueError, match=match):
    cls(**changes)
  # The same check fires through the whole config, by flat name.
  with pytest.raises(ValueError, match=match):
    TripletConfig(**{("data" if k == "kind" else k): v for k, v in changes.items()})


def test_the_enums_have_one_owner():
  from jaxface.data import align
  from jaxface.losses import STRATEGIES
  from jaxface.parallel import distributed
  from jaxface.train import heads
  assert "semihard" in STRATEGIES and heads.MARGIN_KINDS == ("cosface", "arcface")
  assert align.ALIGN_METHODS == ("none", "dlib") and distributed.MODES == ("off", "on", "auto")
  assert not hasattr(config_lib, "STRATEGIES")
  import experiments.bench.triplet_loss as bench
  assert not hasattr(bench, "STRATEGIES")


@pytest.mark.parametrize("changes,match", [
    (dict(spatial_rank=1, image_size=(64,), crop_size=(56,), channels=1, eval_flip=False),
     "^flip=True: flipping a signal reverses time"),
    (dict(spatial_rank=3, image_size=(12, 12, 12), crop_size=(10, 10, 10), flip=False, scale=0.1),
     r"^scale=0.1: is an image \(2-D\) augmentation"),
    (dict(spatial_rank=3, image_size=(12, 12, 12), crop_size=(10, 10, 10), eval_crops=5),
     "^eval_crops=5: corner crops"),
    (dict(init="dlib", embedding_dim=64, image_size=(108, 108), crop_size=(104, 104)),
     "^embedding_dim=64: init='dlib' keeps"),
    (dict(widths=(8, 16), depths=(1,)), "widths .* and depths .* must be non-empty and of equal length"),
])
def test_rules_between_groups_are_checked_when_built(changes, match):
  with pytest.raises(ValueError, match=match):
    TripletConfig(**changes)
