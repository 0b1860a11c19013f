"""Receptive-field crops and grid PNGs."""

import numpy as np
import pytest

from jaxface.visualize import render


def _crop_reference(image, box, fill):
  (y0, y1), (x0, x1) = box
  h, w, c = image.shape
  out = np.empty((y1 - y0 + 1, x1 - x0 + 1, c), np.uint8)
  for y in range(y0, y1 + 1):
    for x in range(x0, x1 + 1):
      out[y - y0, x - x0] = image[y, x] if 0 <= y < h and 0 <= x < w else fill
  return out


@pytest.mark.parametrize("box", [((2, 5), (1, 3)), ((-3, 4), (5, 12)), ((-2, 12), (-4, 11)),
                                 ((8, 9), (0, 0))])
def test_crop_matches_reference(box):
  image = np.random.default_rng(0).integers(0, 256, (10, 9, 3), dtype=np.uint8)
  np.testing.assert_array_equal(render.crop(image, box, fill=77), _crop_reference(image, box, 77))


def test_clip_box_and_center_cell():
  assert render.clip_box(((-5, 20), (3, 7)), (10, 10)) == ((0, 9), (3, 7))
  with pytest.raises(ValueError, match="outside"):
    render.clip_box(((12, 20), (0, 3)), (10, 10))
  # Field 707 px of unit 3 (stride 32, start -320) is centred on pixel 129: cell [113, 144].
  box = ((-320 + 3 * 32, -320 + 3 * 32 + 706),) * 2
  shown = render.clip_box(box, (150, 150))
  assert render.center_cell(box, (32, 32), shown) == ((113, 144),) * 2
  assert render.center_cell(((-10, 10), (0, 4)), (8, 2), ((0, 10), (0, 4))) == ((0, 3), (1, 2))


def test_mark_draws_a_rectangle_on_a_copy():
  patch = np.zeros((6, 6, 1), np.uint8)
  out = render.mark(patch, ((1, 3), (2, 4)))
  assert out.shape == (6, 6, 3) and patch.max() == 0
  assert (out[1, 2:5] == [255, 0, 0]).all() and (out[2, 3] == 0).all()


def test_grid_layout_and_blank_cells():
  patches = [[np.full((5, 5, 3), 200, np.uint8), None], [np.zeros((3, 7, 1), np.uint8)] * 2]
  img = render.grid(patches, cell=10, gap=2)
  assert img.size == (2 * 10 + 3 * 2, 2 * 10 + 3 * 2)
  a = np.asarray(img)
  assert (a[2:12, 2:12] == 200).all()          # first patch upscaled to the whole cell
  assert (a[2:12, 14:24] == 255).all()         # None: blank
  labelled = render.grid(patches, cell=10, row_labels=["u0", "u1"], title="t")
  assert labelled.size[0] > img.size[0] and labelled.size[1] > img.size[1]


def test_bad_inputs():
  with pytest.raises(ValueError, match="uint8"):
    render.crop(np.zeros((4, 4, 3), np.float32), ((0, 1), (0, 1)))
  with pytest.raises(ValueError, match="box"):
    render.crop(np.zeros((4, 4, 3), np.uint8), ((2, 1), (0, 1)))
  with pytest.raises(ValueError, match="row_labels"):
    render.grid([[np.zeros((2, 2, 3), np.uint8)]], row_labels=["a", "b"])
  with pytest.raises(ValueError, match="at least one"):
    render.grid([])
