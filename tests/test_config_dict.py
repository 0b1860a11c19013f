"""Tests for jaxface.config_dict: the JSON round trip saved with every checkpoint."""

import dataclasses
import json

import pytest

from jaxface.config_dict import JsonConfig
from jaxface.style.config import NSTConfig
from jaxface.train.config import TripletConfig


@dataclasses.dataclass(frozen=True)
class _Toy(JsonConfig):
  size: tuple[int, ...] = (3, 4)
  name: str = "x"


@pytest.mark.parametrize("cls", [_Toy, TripletConfig, NSTConfig])
def test_round_trip_through_json_restores_tuples(cls):
  cfg = cls()
  d = json.loads(json.dumps(cfg.to_dict()))  # what a checkpoint stores
  assert cls.from_dict(d) == cfg
  tuples = [f.name for f in dataclasses.fields(cls) if isinstance(getattr(cfg, f.name), tuple)]
  for name in tuples:
    assert isinstance(d[name], list)


def test_to_dict_turns_tuples_into_lists_and_keeps_other_values():
  assert _Toy(size=(1, 2, 3), name="y").to_dict() == {"size": [1, 2, 3], "name": "y"}


def test_unknown_keys_are_refused_by_name():
  with pytest.raises(ValueError, match=r"unknown config keys: \['colour', 'depth'\]"):
    _Toy.from_dict({"size": [1], "depth": 3, "colour": "red"})


def test_missing_keys_take_the_defaults():
  assert _Toy.from_dict({"name": "z"}) == _Toy(name="z")
