"""Tests for jaxface.images.load_image: every input kind built in a tmp dir with PIL."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from jaxface import images
from jaxface.images import ImageError, ImageTooLargeError, load_image

# --------------------------------------------------------------------------
# Slow, obviously-correct references
# --------------------------------------------------------------------------


def ref_composite(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """round-half-up(c * a / 255) pixel by pixel (no ties exist: c*a/255 is never k + 1/2)."""
  out = np.zeros(color.shape, np.uint8)
  for idx in np.ndindex(color.shape):
    out[idx] = int(np.floor(int(color[idx]) * int(alpha[idx[:2]]) / 255.0 + 0.5))
  return out


def ref_gray_to_rgb(g: np.ndarray) -> np.ndarray:
  return np.stack([g, g, g], axis=-1)


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes | None) -> bytes:
  """Minimal PNG encoder (filter 0 on every row); `raw=None` writes an empty IDAT."""
  def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
  ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
  idat = zlib.compress(raw if raw is not None else b"")
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rgb16_png(arr: np.ndarray) -> bytes:
  h, w, _ = arr.shape
  rows = [b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h)]
  return png_bytes(w, h, 16, 2, b"".join(rows))


@pytest.fixture
def rng():
  return np.random.default_rng(0)


# --------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------


def test_uint8_rgb_array_is_returned_as_is(rng):
  a = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
  out = load_image(a)
  assert out.dtype == np.uint8 and out.shape == (7, 5, 3)
  assert out is a  # contiguous uint8 RGB needs no copy
  out2 = load_image(a[:, ::-1])  # non-contiguous view -> contiguous copy
  assert out2.flags["C_CONTIGUOUS"]
  np.testing.assert_array_equal(out2, a[:, ::-1])


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 1)])
def test_gray_arrays_replicate(rng, shape):
  a = rng.integers(0, 256, shape, dtype=np.uint8)
  out = load_image(a)
  assert out.shape == (6, 4, 3) and out.flags["C_CONTIGUOUS"]
  np.testing.assert_array_equal(out, ref_gray_to_rgb(a.reshape(6, 4)))


def test_uint16_array_keeps_high_byte(rng):
  a = rng.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
  a[0, 0] = [65535, 256, 255]  # 255 -> 0 (not clipped to 255), 65535 -> 255
  out = load_image(a)
  np.testing.assert_array_equal(out, (a // 256).astype(np.uint8))
  assert out[0, 0].tolist() == [255, 1, 0]


def test_float_array_in_unit_range(rng):
  a = rng.random((4, 5, 3))
  a[0, 0] = [0.0, 1.0, 0.5 / 255 + 1e-9]
  out = load_image(a.astype(np.float32))
  ref = np.array([[[int(np.floor(float(np.float32(v)) * 255 + 0.5)) for v in px] for px in row] for row in a])
  np.testing.assert_array_equal(out, ref)
  assert out[0, 0].tolist() == [0, 255, 1]


@pytest.mark.parametrize("bad, match", [
    (np.array([[0.0, np.nan]]), "NaN"),
    (np.array([[0.0, np.inf]]), "NaN or inf"),
    (np.array([[0.0, 1.5]]), r"\[0, 1\]"),
    (np.array([[-0.1, 0.5]]), r"\[0, 1\]"),
    (np.zeros((2, 2), np.int32), "dtype int32"),
    (np.zeros((2, 2), np.complex64), "dtype complex64"),
    (np.zeros((2, 2, 5), np.uint8), "channels"),
    (np.zeros((3, 2, 2, 3), np.uint8), "shape"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (np.zeros((7,), np.uint8), "shape"),
])
def test_bad_arrays_raise_value_error(bad, match):
  with pytest.raises(ValueError, match=match):
    load_image(bad)


def test_bool_array(rng):
  a = rng.random((3, 4)) > 0.5
  np.testing.assert_array_equal(load_image(a), ref_gray_to_rgb(a.astype(np.uint8) * 255))


@pytest.mark.parametrize("channels", [2, 4])
def test_alpha_arrays_composite_on_black(rng, channels):
  a = rng.integers(0, 256, (5, 4, channels), dtype=np.uint8)
  a[0, 0, -1], a[0, 1, -1] = 0, 255  # fully transparent -> black; opaque -> unchanged
  out = load_image(a)
  color = a[..., :-1] if channels == 4 else np.repeat(a[..., :1], 3, axis=-1)
  np.testing.assert_array_equal(out, ref_composite(color, a[..., -1]))
  assert out[0, 0].tolist() == [0, 0, 0]
  np.testing.assert_array_equal(out[0, 1], color[0, 1])


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(st.sampled_from([np.uint8, np.uint16]),
                  st.tuples(st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 3]))))
def test_integer_arrays_property(a):
  out = load_image(a)
  assert out.shape == a.shape[:2] + (3,) and out.dtype == np.uint8
  expected = a if a.dtype == np.uint8 else a // 256
  np.testing.assert_array_equal(out, np.broadcast_to(expected, out.shape))


def test_unsupported_types():
  with pytest.raises(ValueError, match="bytes"):
    load_image(b"\x89PNG")
  with pytest.raises(ValueError, match="expected a path"):
    load_image(12)
  with pytest.raises(ValueError, match="max_pixels"):
    load_image(np.zeros((2, 2), np.uint8), max_pixels=0)


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def test_16bit_gray_png_and_tiff(tmp_path, rng):
  a = rng.integers(0, 65536, (9, 11), dtype=np.uint16)
  a[0, :3] = [65535, 300, 255]
  for ext in ("png", "tif"):
    p = tmp_path / f"g16.{ext}"
    Image.fromarray(a).save(p)
    with Image.open(p) as im:
      assert im.mode.startswith("I;16")  # the case under test really is 16-bit
    out = load_image(p)
    np.testing.assert_array_equal(out, ref_gray_to_rgb((a // 256).astype(np.uint8)))
    assert out[0, :3, 0].tolist() == [255, 1, 0]


def test_16bit_rgb_png(tmp_path, rng):
  a = rng.integers(0, 65536, (6, 7, 3), dtype=np.uint16)
  p = tmp_path / "rgb16.png"
  p.write_bytes(rgb16_png(a))
  np.testing.assert_array_equal(load_image(p), (a // 256).astype(np.uint8))


def _asymmetric_rgb(h=32, w=48) -> np.ndarray:
  """Big flat blocks (survive JPEG) that tell every rotation/flip apart."""
  a = np.zeros((h, w, 3), np.uint8)
  a[: h // 2, : w // 2] = [255, 0, 0]
  a[: h // 2, w // 2:] = [0, 255, 0]
  a[h // 2:, : w // 4] = [0, 0, 255]
  return a


def test_exif_orientation_6_jpeg(tmp_path):
  a = _asymmetric_rgb()
  im = Image.fromarray(a)
  plain, rotated = tmp_path / "plain.jpg", tmp_path / "exif6.jpg"
  im.save(plain, quality=95)
  exif = Image.Exif()
  exif[0x0112] = 6
  im.save(rotated, quality=95, exif=exif)
  base = load_image(plain)
  out = load_image(rotated)
  # Orientation 6: the stored image must be turned 90 degrees clockwise for display.
  assert out.shape == (48, 32, 3)
  np.testing.assert_array_equal(out, np.rot90(base, k=-1))
  assert not np.array_equal(out, np.rot90(base, k=1))
  # Same through a PIL image and a file object.
  with Image.open(rotated) as pim:
    np.testing.assert_array_equal(load_image(pim), out)
  with open(rotated, "rb") as f:
    np.testing.assert_array_equal(load_image(f), out)


def test_rgba_png_composites_on_black(tmp_path, rng):
  a = rng.integers(0, 256, (8, 9, 4), dtype=np.uint8)
  p = tmp_path / "rgba.png"
  Image.fromarray(a, "RGBA").save(p)
  np.testing.assert_array_equal(load_image(p), ref_composite(a[..., :3], a[..., 3]))


def test_la_and_palette_transparency(tmp_path, rng):
  la = rng.integers(0, 256, (5, 6, 2), dtype=np.uint8)
  p = tmp_path / "la.png"
  Image.fromarray(la, "LA").save(p)
  np.testing.assert_array_equal(load_image(p), ref_composite(np.repeat(la[..., :1], 3, -1), la[..., 1]))

  idx = rng.integers(0, 4, (5, 6), dtype=np.uint8)
  pal = Image.fromarray(idx, "P")
  colors = [10, 20, 30, 200, 100, 50, 7, 8, 9, 250, 251, 252]
  pal.putpalette(colors + [0] * (768 - len(colors)))
  pal.info["transparency"] = 2
  pp = tmp_path / "pal.png"
  pal.save(pp, transparency=2)
  out = load_image(pp)
  table = np.array(colors, np.uint8).reshape(4, 3)
  expected = table[idx].copy()
  expected[idx == 2] = 0  # the transparent index composites to black
  np.testing.assert_array_equal(out, expected)


def test_grayscale_modes(tmp_path, rng):
  g = rng.integers(0, 256, (6, 5), dtype=np.uint8)
  p = tmp_path / "l.png"
  Image.fromarray(g, "L").save(p)
  np.testing.assert_array_equal(load_image(p), ref_gray_to_rgb(g))

  bits = rng.random((6, 5)) > 0.5
  p1 = tmp_path / "one.png"
  Image.fromarray(bits).save(p1)
  np.testing.assert_array_equal(load_image(p1), ref_gray_to_rgb(bits.astype(np.uint8) * 255))

  i32 = rng.integers(-5, 70000, (6, 5)).astype(np.int32)
  im_i = Image.fromarray(i32, "I")
  assert im_i.mode == "I"
  expected = (np.clip(i32, 0, 65535) // 256).astype(np.uint8)
  np.testing.assert_array_equal(load_image(im_i), ref_gray_to_rgb(expected))

  f = rng.random((6, 5)).astype(np.float32)
  im_f = Image.fromarray(f, "F")
  np.testing.assert_array_equal(load_image(im_f), ref_gray_to_rgb(np.rint(f.astype(np.float64) * 255).astype(np.uint8)))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    load_image(Image.fromarray(f * 255, "F"))


def test_cmyk_uses_pil_conversion(tmp_path, rng):
  a = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
  im = Image.fromarray(a, "CMYK")
  p = tmp_path / "cmyk.tif"
  im.save(p)
  out = load_image(p)
  # PIL's own conversion (its formula changed across Pillow versions), plus fixed points.
  np.testing.assert_array_equal(out, np.asarray(im.convert("RGB")))
  fixed = np.array([[[0, 0, 0, 0], [0, 0, 0, 255], [255, 255, 255, 0]]], np.uint8)
  assert load_image(Image.fromarray(fixed, "CMYK")).tolist() == [[[255] * 3, [0] * 3, [0] * 3]]


def test_truncated_jpeg_names_path(tmp_path):
  p = tmp_path / "full.jpg"
  Image.fromarray(_asymmetric_rgb(64, 64)).save(p, quality=90)
  data = p.read_bytes()
  t = tmp_path / "truncated.jpg"
  t.write_bytes(data[: len(data) // 2])
  with pytest.raises(ImageError, match="truncated.jpg") as e:
    load_image(t)
  assert isinstance(e.value, ValueError)


def test_non_image_and_missing_files(tmp_path):
  txt = tmp_path / "notes.txt"
  txt.write_text("this is not an image\n")
  with pytest.raises(ValueError, match="notes.txt"):
    load_image(txt)
  with pytest.raises(ValueError, match="is a directory"):
    load_image(tmp_path)
  with pytest.raises(FileNotFoundError, match="missing.png"):
    load_image(str(tmp_path / "missing.png"))


def test_bomb_refused_by_override_limit(tmp_path):
  p = tmp_path / "small.png"
  Image.fromarray(np.zeros((100, 100), np.uint8)).save(p)
  with pytest.raises(ImageTooLargeError, match="small.png.*10,000 pixels exceeds the limit of 9,999"):
    load_image(p, max_pixels=9999)
  with pytest.raises(ImageTooLargeError):
    load_image(Image.open(p), max_pixels=9999)
  assert load_image(p, max_pixels=10000).shape == (100, 100, 3)


def test_limit_can_be_raised_from_the_environment_and_the_message_says_how(tmp_path, monkeypatch):
  p = tmp_path / "small.png"
  Image.fromarray(np.zeros((100, 100), np.uint8)).save(p)
  monkeypatch.setenv("JAXFACE_MAX_IMAGE_PIXELS", "9_999")
  assert images.default_max_pixels() == 9999
  with pytest.raises(ImageTooLargeError) as e:
    load_image(p)
  # The message names the variable and a value that lets this image through.
  assert "exceeds the limit of 9,999" in str(e.value)
  assert "JAXFACE_MAX_IMAGE_PIXELS=10_000" in str(e.value) and "max_pixels=" in str(e.value)
  monkeypatch.setenv("JAXFACE_MAX_IMAGE_PIXELS", "10000")
  assert load_image(p).shape == (100, 100, 3)
  assert load_image(p, max_pixels=None).shape == (100, 100, 3)  # an explicit limit still wins
  with pytest.raises(ImageTooLargeError):
    load_image(p, max_pixels=5000)
  monkeypatch.setenv("JAXFACE_MAX_IMAGE_PIXELS", "none")
  assert images.default_max_pixels() is None
  monkeypatch.setenv("JAXFACE_MAX_IMAGE_PIXELS", "lots")
  with pytest.raises(ValueError, match=r"\$JAXFACE_MAX_IMAGE_PIXELS='lots': expected a positive"):
    load_image(p)
  monkeypatch.delenv("JAXFACE_MAX_IMAGE_PIXELS")
  assert images.default_max_pixels() == images.DEFAULT_MAX_PIXELS


def test_huge_header_refused_before_decoding(tmp_path):
  # 100k x 100k declared (30 GB decoded) with no pixel data: refused from the header alone.
  p = tmp_path / "bomb.png"
  p.write_bytes(png_bytes(100_000, 100_000, 8, 2, None))
  with pytest.raises(ImageTooLargeError, match="bomb.png") as e:
    load_image(p)
  assert "JAXFACE_MAX_IMAGE_PIXELS=10_000_000_000" in str(e.value)


def test_pil_bomb_warning_never_escapes_and_limit_restored(tmp_path, monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # PIL: warn > 5000, error > 10000
  p = tmp_path / "mid.png"
  Image.fromarray(np.full((80, 100), 7, np.uint8)).save(p)  # 8000 px: PIL would warn
  big = tmp_path / "big.png"
  Image.fromarray(np.full((120, 100), 9, np.uint8)).save(big)  # 12000 px: PIL would refuse
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert load_image(p)[0, 0, 0] == 7
    assert load_image(big, max_pixels=20000)[0, 0, 0] == 9  # our limit overrides PIL's
    assert load_image(big, max_pixels=None)[0, 0, 0] == 9
  with pytest.raises(ImageTooLargeError):
    load_image(big, max_pixels=11000)
  assert Image.MAX_IMAGE_PIXELS == 5000


def test_default_limit_matches_pil_hard_limit():
  assert images.DEFAULT_MAX_PIXELS == 178_956_970


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_with_exif_orientation(fmt):
  a = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
  exif = Image.Exif()
  exif[0x0112] = 6
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format=fmt, exif=exif)
  buf.seek(0)
  out = load_image(buf)
  assert out.shape == (4, 3, 3)
  np.testing.assert_array_equal(out[..., 0], np.rot90((a // 256).astype(np.uint8), k=-1))
