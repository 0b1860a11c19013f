"""JSON round trip of the experiments' frozen config dataclasses (saved with every checkpoint)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T", bound="JsonConfig")


class JsonConfig:
  """Mixin for a config dataclass: ``to_dict`` (tuples as lists, JSON-ready) and
  ``from_dict`` (lists back to tuples; refuses keys the dataclass does not have,
  naming them)."""

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls: type[T], d: dict[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown config keys: {sorted(unknown)}")
    # JSON has no tuples; frozen configs hold tuples so they compare and hash by value.
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def field(default: Any, help: str = "", *, flag: str | None = None) -> Any:
  """A config dataclass field whose metadata holds its help text and, when its flag
  is not named like the field, the flag's name (``experiments.flagutil`` defines
  one absl flag per field from them)."""
  metadata = {"help": help} if flag is None else {"help": help, "flag": flag}
  return dataclasses.field(default=default, metadata=metadata)


def invalid(name: str, value: Any, why: str) -> ValueError:
  """The error of a bad setting, naming the parameter: ``name=value!r: why``."""
  return ValueError(f"{name}={value!r}: {why}")
