"""Tests for jaxface.data's lazy exports."""

import subprocess
import sys

import pytest

import jaxface.data as data
from jaxface.data import sampler, source


def test_exports_resolve_to_submodule_objects():
  assert data.PKSampler is sampler.PKSampler
  assert data.split_by_identity is source.split_by_identity
  for name in data.__all__:
    assert getattr(data, name) is not None
  assert set(data.__all__) <= set(dir(data))
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    _ = data.nope


def test_import_loads_no_heavy_dependency():
  code = ("import sys, jaxface.data; "
          "print(sorted(m for m in ('jax', 'PIL', 'tensorflow_datasets') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
