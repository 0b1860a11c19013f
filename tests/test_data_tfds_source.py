"""Tests for jaxface.data.tfds_source.TfdsSource.

Nothing is downloaded: datasets come from ``tfds.testing.mock_data`` or from a tiny
ArrayRecord preparation written here without TensorFlow.
"""

import io
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxface.data.tfds_source import TfdsSource


def _write_prepared_lfw(data_dir, images, names):
  """Writes an 'lfw' train split in ArrayRecord format, as `tfds build` would (no TF needed)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  builder = tfds.builder("lfw", data_dir=str(data_dir), file_format="array_record")
  os.makedirs(builder.data_dir, exist_ok=True)
  template = tfds.core.ShardedFileTemplate(
      data_dir=builder.data_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
      dataset_name="lfw", split="train", filetype_suffix="array_record")
  writer = array_record_module.ArrayRecordWriter(
      os.fspath(template.sharded_filepath(shard_index=0, num_shards=1)), "group_size:1")
  total = 0
  for img, name in zip(images, names):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")  # lossless, so pixels can be compared exactly
    record = builder.info.features.serialize_example({"image": buf.getvalue(), "label": name})
    writer.write(record)
    total += len(record)
  writer.close()
  split = tfds.core.SplitInfo(name="train", shard_lengths=[len(names)], num_bytes=total,
                              filename_template=template)
  builder.info.set_splits(tfds.core.SplitDict([split]))
  builder.info.write_to_directory(builder.data_dir)


def test_prepared_array_record_lfw(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 250, 250, 3), dtype=np.uint8)
  names = ["Person_10", "Person_2", "Person_2", "Alice", "Person_10", "Person_2", "Person_1"]
  _write_prepared_lfw(tmp_path, images, names)
  decoded = []
  original = tfds.features.Image.decode_example_np
  monkeypatch.setattr(tfds.features.Image, "decode_example_np",
                      lambda self, *a, **kw: decoded.append(1) or original(self, *a, **kw))
  s = TfdsSource("lfw", data_dir=tmp_path)
  assert len(decoded) == 1  # the label pass leaves images encoded; one decode gives the shape
  assert s.identity_names == ["Alice", "Person_1", "Person_2", "Person_10"]  # natural order
  assert [s.identity_names[i] for i in s.labels] == names
  assert s.image_shape == (250, 250, 3) and len(s) == 7
  np.testing.assert_array_equal(s.get([3, 0, 3]), images[[3, 0, 3]])
  small = TfdsSource("lfw", data_dir=tmp_path, image_size=(32, 24), channels=1)
  want = Image.fromarray(images[5]).convert("L").resize((24, 32), Image.Resampling.BILINEAR)
  np.testing.assert_array_equal(small.get([5])[0, ..., 0], np.asarray(want))
  # Sub-split specs pass through to TFDS.
  assert len(TfdsSource("lfw", split="train[:3]", data_dir=tmp_path)) == 3


def test_not_prepared_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError, match=r"not prepared.*tfds build lfw --data_dir=.* --file_format=array_record"):
    TfdsSource("lfw", data_dir=tmp_path / "empty")
  with pytest.raises(ValueError, match="no dataset named 'no_such_dataset_xyz'"):
    TfdsSource("no_such_dataset_xyz", data_dir=tmp_path)


def test_mock_lfw_string_labels():
  with tfds.testing.mock_data(num_examples=6):
    s = TfdsSource("lfw", image_size=(40, 40))
    raw = tfds.data_source("lfw", split="train")
    expected_names = [raw[i]["label"] for i in range(6)]
    expected_names = [n.decode() if isinstance(n, bytes) else n for n in expected_names]
    assert [s.identity_names[i] for i in s.labels] == expected_names
    assert s.image_shape == (40, 40, 3)
    want = Image.fromarray(raw[4]["image"]).resize((40, 40), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(s.get([4])[0], np.asarray(want))


def test_mock_mnist_class_labels_and_channels():
  with tfds.testing.mock_data(num_examples=5):
    s = TfdsSource("mnist", split="test", channels=3)
    raw = tfds.data_source("mnist", split="test")
    assert s.identity_names == [str(d) for d in range(10)]
    np.testing.assert_array_equal(s.labels, [raw[i]["label"] for i in range(5)])
    assert s.image_shape == (28, 28, 3)
    np.testing.assert_array_equal(s.get([2]), np.repeat(raw[2]["image"][None], 3, axis=3))


class _FakeRecords:
  """A data source with batched reads, standing in for a custom dataset."""

  def __init__(self, records):
    self.records = records
    self.batched_calls = 0

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]

  def __getitems__(self, keys):
    self.batched_calls += 1
    return [self.records[k] for k in keys]


def test_custom_data_source_batched_reads_and_errors():
  records = [{"image": np.full((6, 5, 1), i, np.uint8), "face": f"p{i % 3 + 8}".encode()}
             for i in range(9)]
  fake = _FakeRecords(records)
  with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: fake):
    s = TfdsSource("lfw", label_key="face", channels=1)
    assert s.identity_names == ["p8", "p9", "p10"]
    np.testing.assert_array_equal(s.labels, [0, 1, 2] * 3)
    calls = fake.batched_calls
    np.testing.assert_array_equal(s.get([7, 2])[..., 0, 0, 0], [7, 2])
    assert fake.batched_calls == calls + 1
    with pytest.raises(ValueError, match=r"has no feature 'label'; it has \['face', 'image'\]"):
      TfdsSource("lfw")
    records[4] = {"image": np.zeros((7, 5, 1), np.uint8), "face": b"p8"}
    s = TfdsSource("lfw", label_key="face", channels=1)
    with pytest.raises(ValueError, match=r"record 4 .* shape \(7, 5, 1\) but the first has \(6, 5, 1\)"):
      s.get([3, 4])
