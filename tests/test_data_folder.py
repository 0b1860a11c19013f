"""Tests for jaxface.data.folder.ImageFolderSource (tmp folders and the shared real data)."""

import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from jaxface import paths
from jaxface.data.folder import ImageFolderSource, conform_array
from jaxface.data.source import split_by_identity


def _rgb(seed, h=12, w=10):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path, arr, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, **kw)
  return arr


@pytest.fixture
def tree(tmp_path):
  """root/{alice, bob, s2, s10, empty, carol}, stray files, one truncated JPEG."""
  root = tmp_path / "faces"
  px = {}
  px["alice/1.png"] = _save(str(root / "alice" / "1.png"), _rgb(1))
  px["alice/10.PNG"] = _save(str(root / "alice" / "10.PNG"), _rgb(2), format="PNG")
  px["alice/2.bmp"] = _save(str(root / "alice" / "2.bmp"), _rgb(3))
  (root / "alice" / "notes.txt").write_text("not an image")
  (root / "alice" / ".hidden.png").write_bytes(b"junk")
  px["bob/a.pgm"] = _save(str(root / "bob" / "a.pgm"), _rgb(4)[..., 0])  # grayscale
  px["s10/x.tiff"] = _save(str(root / "s10" / "x.tiff"), _rgb(5))
  px["s2/y.png"] = _save(str(root / "s2" / "y.png"), _rgb(6))
  os.makedirs(root / "empty")
  (root / "empty" / "README").write_text("nothing here")
  px["carol/ok.png"] = _save(str(root / "carol" / "ok.png"), _rgb(7))
  _save(str(root / "carol" / "full.jpg"), _rgb(8), quality=90)
  data = (root / "carol" / "full.jpg").read_bytes()
  (root / "carol" / "bad.jpg").write_bytes(data[: len(data) // 2])
  os.remove(root / "carol" / "full.jpg")
  (root / "PROVENANCE.md").write_text("# provenance")
  (root / "ORIGINAL_README.txt").write_text("readme")
  os.makedirs(root / ".git")
  _save(str(root / ".git" / "z.png"), _rgb(9))
  return root, px


def test_loads_layout_skipping_strays_and_bad_files(tree, caplog):
  root, px = tree
  with caplog.at_level(logging.WARNING):
    s = ImageFolderSource(root)
  # Natural order of folders; empty and hidden folders left out.
  assert s.identity_names == ["alice", "bob", "carol", "s2", "s10"]
  rel = [os.path.relpath(p, root) for p in s.paths]
  assert rel == ["alice/1.png", "alice/2.bmp", "alice/10.PNG", "bob/a.pgm", "carol/ok.png",
                 "s2/y.png", "s10/x.tiff"]
  np.testing.assert_array_equal(s.labels, [0, 0, 0, 1, 2, 3, 4])
  assert s.image_shape == (12, 10, 3) and s.images.dtype == np.uint8
  for k, r in enumerate(rel):
    want = px[r] if px[r].ndim == 3 else np.repeat(px[r][..., None], 3, axis=2)
    np.testing.assert_array_equal(s.get([k])[0], want)
  assert [os.path.basename(p) for p, _ in s.skipped] == ["bad.jpg"]
  assert "bad.jpg" in caplog.text and "truncated" in caplog.text.lower()


def test_on_error_raise_names_the_file(tree):
  root, _ = tree
  with pytest.raises(ValueError, match=r"cannot read image .*carol/bad\.jpg"):
    ImageFolderSource(root, on_error="raise")


def test_grayscale_and_resize_match_pil(tree):
  root, px = tree
  s = ImageFolderSource(root, image_size=(6, 8), channels=1)
  assert s.image_shape == (6, 8, 1)
  k = s.paths.index(str(root / "alice" / "10.PNG"))
  want = Image.fromarray(px["alice/10.PNG"]).convert("L").resize((8, 6), Image.Resampling.BILINEAR)
  np.testing.assert_array_equal(s.get([k])[0, ..., 0], np.asarray(want))


def test_min_images_drops_small_identities(tree):
  root, _ = tree
  s = ImageFolderSource(root, min_images=2)
  assert s.identity_names == ["alice"]  # carol has one readable image left
  np.testing.assert_array_equal(s.labels, [0, 0, 0])


def test_size_mismatch_is_an_error_naming_the_file(tmp_path):
  _save(str(tmp_path / "a" / "1.png"), _rgb(0, 12, 10))
  _save(str(tmp_path / "b" / "1.png"), _rgb(1, 11, 10))
  with pytest.raises(ValueError, match=r"b/1\.png.* pass image_size"):
    ImageFolderSource(tmp_path)
  assert ImageFolderSource(tmp_path, image_size=(5, 5)).image_shape == (5, 5, 3)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12, 20])
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, caplog, side):
  # With a limit of 100 px: 144 px is in the range where PIL itself only warns,
  # 400 px in the range where PIL raises. Both must be refused.
  _save(str(tmp_path / "a" / "big.png"), _rgb(0, side, side))
  _save(str(tmp_path / "a" / "small.png"), _rgb(1, 10, 5))
  _save(str(tmp_path / "b" / "small.png"), _rgb(2, 10, 5))
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  with pytest.raises(ValueError, match=r"big\.png.*DecompressionBombError"):
    ImageFolderSource(tmp_path, on_error="raise")
  with caplog.at_level(logging.WARNING):
    s = ImageFolderSource(tmp_path, image_size=(10, 5))
  assert len(s) == 2 and "big.png" in caplog.text


def test_root_errors(tmp_path, tree):
  with pytest.raises(ValueError, match=r"'.*nowhere' does not exist"):
    ImageFolderSource(tmp_path / "nowhere")
  (tmp_path / "flat").mkdir()
  (tmp_path / "flat" / "PROVENANCE.md").write_text("x")
  _save(str(tmp_path / "flat" / "loose.png"), _rgb(0))
  (tmp_path / "flat" / "empty_id").mkdir()
  with pytest.raises(ValueError, match=r"flat' has no identity folders with image files"):
    ImageFolderSource(tmp_path / "flat")
  (tmp_path / "broken" / "p").mkdir(parents=True)
  (tmp_path / "broken" / "p" / "x.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match="no readable images"):
    ImageFolderSource(tmp_path / "broken")
  with pytest.raises(ValueError, match="on_error"):
    ImageFolderSource(tree[0], on_error="ignore")
  with pytest.raises(ValueError, match="channels must be 1 or 3"):
    ImageFolderSource(tree[0], channels=4)


def test_root_expands_jaxface_data(tree, monkeypatch):
  root, _ = tree
  monkeypatch.setenv(paths.DATA_ENV, str(root.parent))
  s = ImageFolderSource("$JAXFACE_DATA/faces", min_images=2)
  assert s.identity_names == ["alice"] and s.root == str(root)


def test_conform_array():
  rgb = _rgb(3, 6, 4)
  np.testing.assert_array_equal(conform_array(rgb, 3), rgb)
  np.testing.assert_array_equal(conform_array(rgb, 1)[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
  gray = rgb[..., :1]
  np.testing.assert_array_equal(conform_array(gray, 3), np.repeat(gray, 3, axis=2))
  rgba = np.concatenate([rgb, np.full((6, 4, 1), 255, np.uint8)], axis=2)
  np.testing.assert_array_equal(conform_array(rgba, 3), rgb)
  assert conform_array(rgb, 3, (3, 2)).shape == (3, 2, 3)
  with pytest.raises(ValueError, match="uint8"):
    conform_array(rgb.astype(np.float32))
  with pytest.raises(ValueError, match=r"\[H, W, 1\|3\|4\]"):
    conform_array(np.zeros((4, 4, 2), np.uint8))


def _shared(name):
  root = os.path.join(paths.data_root(), "faces", name)
  if not os.path.isdir(root):
    pytest.skip(f"real data folder {root} is absent (set {paths.DATA_ENV} to the shared data root)")
  return root


def test_real_att_orl():
  root = _shared("att_orl")
  s = ImageFolderSource(root, channels=1)
  assert s.identity_names == [f"s{i}" for i in range(1, 41)]
  assert len(s) == 400 and s.image_shape == (112, 92, 1)
  np.testing.assert_array_equal(s.images_per_identity(), np.full(40, 10))
  k = s.paths.index(os.path.join(root, "s3", "7.pgm"))
  np.testing.assert_array_equal(s.get([k])[0, ..., 0], np.asarray(Image.open(os.path.join(root, "s3", "7.pgm"))))
  assert not s.skipped
  train, hold = split_by_identity(s, num_holdout=10)
  assert hold.identity_names == [f"s{i}" for i in range(31, 41)] and len(train) == 300


def test_real_lfw_subset():
  root = _shared("lfw_subset")
  start = time.perf_counter()
  s = ImageFolderSource(root, image_size=(112, 112))
  elapsed = time.perf_counter() - start
  assert len(s) == 2155 and s.num_identities == 1010 and s.image_shape == (112, 112, 3)
  hist = np.bincount(s.images_per_identity())
  assert hist[1] == 600 and hist[2] == 231 and hist[10] == 48  # PROVENANCE.md histogram
  assert not s.skipped
  assert elapsed < 60.0  # measured ~1.2 s warm on 2 cores
