"""Image decoding and preprocessing: golden parity, the spec's worked examples, formats and limits."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import case_id, golden_cases
from dsocr_jax.config import MODES, get_mode
from dsocr_jax.image.decode import open_image
from dsocr_jax.image.preprocess import (OFFICIAL_CANDIDATES, find_tile_grid, num_image_tokens, preprocess,
                                        python_set_order, tile_grid_for)

# Hand-worked: the pad colour 127 normalises to (127/255 - 0.5)/0.5 = -1/255; white to 1, black to -1.
PAD = -1.0 / 255.0
PIXEL_TOL = 1e-5  # float32 normalisation of identical uint8 pixels; observed 0


# ------------------------------------------------------------------------------------------------- golden


@pytest.mark.parametrize("case", golden_cases(), ids=case_id)
def test_golden_preprocess_matches_official(case, golden_dir):
  g = np.load(case)
  image = open_image(os.path.join(golden_dir, str(g["image_file"])))
  mode = get_mode(str(g["mode"]))
  assert (mode.base_size, mode.image_size, mode.crop_mode) == (int(g["base_size"]), int(g["image_size"]),
                                                               bool(g["crop_mode"]))
  out = preprocess(image, mode, min_crops=int(g["min_crops"]), max_crops=int(g["max_crops"]))
  expected_global = g["pixel_values"][0].transpose(1, 2, 0)
  assert out.global_view.shape == expected_global.shape and out.global_view.dtype == np.float32
  assert np.abs(out.global_view - expected_global).max() <= PIXEL_TOL
  expected_tiles = g["images_crop"].transpose(0, 2, 3, 1)
  assert out.tiles.shape == expected_tiles.shape and out.tiles.dtype == np.float32
  if expected_tiles.size:
    assert np.abs(out.tiles - expected_tiles).max() <= PIXEL_TOL
  assert list(out.spatial_crop) == g["images_spatial_crop"][0].tolist()
  assert out.num_tokens == int(g["num_image_tokens"])
  assert out.original_size == image.size


# -------------------------------------------------------------------------------------- spec-given values

SPEC_CANDIDATES = {
    6: [(1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1), (2, 3), (1, 6), (3, 2)],
    9: [(1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1), (3, 2), (2, 3),
        (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1)],
}


@pytest.mark.parametrize("max_crops", [6, 9])
def test_candidate_orders_are_the_spec_lists(max_crops):
  assert list(OFFICIAL_CANDIDATES[(2, max_crops)]) == SPEC_CANDIDATES[max_crops]
  # The generator used for other bounds reproduces the official CPython set order for these two.
  assert list(python_set_order(2, max_crops)) == SPEC_CANDIDATES[max_crops]


# Spec 4.4 worked examples (Gundam): (w, h, max_crops) -> (grid, tokens).
SPEC_TABLE = [
    (640, 480, 6, (1, 1), 273), (640, 480, 9, (1, 1), 273),
    (1190, 1684, 6, (2, 3), 903), (1190, 1684, 9, (2, 3), 903),
    (1920, 1080, 6, (2, 1), 483), (1920, 1080, 9, (4, 2), 1093),
    (800, 600, 6, (3, 2), 893), (800, 600, 9, (3, 2), 893),
]


@pytest.mark.parametrize("w,h,max_crops,grid,tokens", SPEC_TABLE)
def test_spec_worked_examples(w, h, max_crops, grid, tokens):
  out = preprocess(Image.new("RGB", (w, h), (255, 255, 255)), "gundam", max_crops=max_crops)
  assert out.spatial_crop == grid
  assert out.num_tokens == tokens
  assert out.tiles.shape == ((grid[0] * grid[1] if grid != (1, 1) else 0), 640, 640, 3)


# Spec 4.4 global-view geometry: (w, h) -> resized (w', h') pasted at (x, y) on the 1024 canvas.
SPEC_GEOMETRY = [((1190, 1684), (724, 1024), (150, 0)), ((1920, 1080), (1024, 576), (0, 224)),
                 ((640, 480), (1024, 768), (0, 128))]


@pytest.mark.parametrize("size,resized,offset", SPEC_GEOMETRY)
def test_spec_global_view_geometry(size, resized, offset):
  view = preprocess(Image.new("RGB", size, (255, 255, 255)), "gundam").global_view
  (rw, rh), (x, y) = resized, offset
  content = np.zeros((1024, 1024), bool)
  content[y:y + rh, x:x + rw] = True
  assert np.all(view[content] == 1.0)  # a constant image stays constant under bicubic resizing
  assert np.allclose(view[~content], PAD, atol=1e-7)


def test_tie_rule_prefers_finer_grid_only_for_large_images():
  # Aspect 2.0 ties exactly between (2,1) and (4,2) with max 9; (4,2) wins iff area > 0.5 * 640^2 * 8 = 1,638,400.
  assert find_tile_grid(2000, 1000, image_size=640, max_crops=9) == (4, 2)  # area 2,000,000
  assert find_tile_grid(1300, 650, image_size=640, max_crops=9) == (2, 1)  # area 845,000
  assert find_tile_grid(2000, 1000, image_size=640, max_crops=6) == (2, 1)  # (4,2) is not a candidate


def test_no_tiling_threshold_is_640_in_every_crop_mode():
  assert tile_grid_for((640, 640), MODES["gundam"]) == (1, 1)
  assert tile_grid_for((641, 640), MODES["gundam"]) != (1, 1)
  assert tile_grid_for((641, 640), MODES["gundam-m"]) != (1, 1)  # literal 640, not the 1024 tile size
  assert tile_grid_for((3000, 1000), MODES["base"]) == (1, 1)  # crop mode off


@pytest.mark.parametrize("name,tokens", [("tiny", 73), ("small", 111), ("base", 273), ("large", 421)])
def test_spec_mode_token_counts(name, tokens):
  assert num_image_tokens(MODES[name], (1, 1)) == tokens


def test_gundam_m_token_count():
  # Spec 4.1: 421 + (16*th)(16*tw + 1); for (3, 2): 421 + 32*49 = 1989.
  assert num_image_tokens(MODES["gundam-m"], (3, 2)) == 1989


def test_tiny_and_small_squash_before_padding():
  # A 300x100 white image squashed to a square leaves no pad pixels in the global view.
  for name, side in (("tiny", 512), ("small", 640)):
    view = preprocess(Image.new("RGB", (300, 100), (255, 255, 255)), name).global_view
    assert view.shape == (side, side, 3) and np.all(view == 1.0)


def test_tiles_are_row_major():
  # 1280x1280 (aspect 1, max 6) -> (2, 2) grid; the resize is a no-op, so each tile is one quadrant's colour.
  colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]  # TL, TR, BL, BR
  arr = np.zeros((1280, 1280, 3), np.uint8)
  for t, c in enumerate(colours):
    r, col = divmod(t, 2)
    arr[r * 640:(r + 1) * 640, col * 640:(col + 1) * 640] = c
  out = preprocess(Image.fromarray(arr), "gundam")
  assert out.spatial_crop == (2, 2) and out.tiles.shape == (4, 640, 640, 3)
  for t, c in enumerate(colours):
    expected = np.asarray(c, np.float32) / 127.5 - 1.0
    assert np.allclose(out.tiles[t], expected, atol=1e-6), t


@pytest.mark.parametrize("kwargs,field", [({"min_crops": 0}, "min_crops"), ({"max_crops": 1}, "max_crops"),
                                          ({"max_crops": 100}, "max_crops"), ({"min_crops": True}, "min_crops"),
                                          ({"max_crops": 6.0}, "max_crops")])
def test_crop_bounds_are_validated(kwargs, field):
  with pytest.raises(ValueError, match=field):
    preprocess(Image.new("RGB", (1000, 700)), "gundam", **kwargs)


def test_unknown_mode_is_rejected():
  with pytest.raises(ValueError, match="mode"):
    preprocess(Image.new("RGB", (10, 10)), "huge")


# ------------------------------------------------------------------------------------------ formats, limits

RGB = (200, 40, 90)


def _save(tmp_path, name, image, **kwargs):
  path = tmp_path / name
  image.save(path, **kwargs)
  return path


def _cmyk_jpeg(tmp_path):
  return _save(tmp_path, "cmyk.jpg", Image.new("RGB", (64, 48), RGB).convert("CMYK"), quality=95)


def _sixteen_bit_png(tmp_path):
  return _save(tmp_path, "g16.png", Image.fromarray(np.full((48, 64), 40000, np.uint16)))


FORMATS = {
    "jpeg": lambda p: _save(p, "a.jpg", Image.new("RGB", (64, 48), RGB), quality=95),
    "webp": lambda p: _save(p, "a.webp", Image.new("RGB", (64, 48), RGB), lossless=True),
    "bmp": lambda p: _save(p, "a.bmp", Image.new("RGB", (64, 48), RGB)),
    "gif": lambda p: _save(p, "a.gif", Image.new("RGB", (64, 48), RGB)),
    "palette_png": lambda p: _save(p, "p.png", Image.new("RGB", (64, 48), RGB).quantize(4)),
    "cmyk_jpeg": _cmyk_jpeg,
    "sixteen_bit_png": _sixteen_bit_png,
    "rgba_png": lambda p: _save(p, "a.png", Image.new("RGBA", (64, 48), RGB + (128,))),
    "la_png": lambda p: _save(p, "la.png", Image.new("LA", (64, 48), (90, 255))),
    "tiff": lambda p: _save(p, "a.tiff", Image.new("RGB", (64, 48), RGB)),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_opens_and_preprocesses(fmt, tmp_path):
  path = FORMATS[fmt](tmp_path)
  for src in (path, str(path), path.read_bytes()):
    image = open_image(src)
    assert image.mode == "RGB" and image.size == (64, 48)
  out = preprocess(image, "base")
  assert out.global_view.shape == (1024, 1024, 3) and np.isfinite(out.global_view).all()
  assert out.original_size == (64, 48) and out.num_tokens == 273


@pytest.mark.parametrize("fmt", ["webp", "bmp", "gif", "palette_png", "tiff"])
def test_lossless_formats_keep_colours(fmt, tmp_path):
  pixels = np.asarray(open_image(FORMATS[fmt](tmp_path)))
  assert np.abs(pixels.astype(int) - RGB).max() <= 2  # GIF / palette quantisation may move a level or two


def test_alpha_is_dropped_not_composited(tmp_path):
  # The official loader just calls convert('RGB'): a fully transparent pixel keeps its stored colour.
  rgba = open_image(_save(tmp_path, "t.png", Image.new("RGBA", (8, 8), (10, 20, 30, 0))))
  assert np.asarray(rgba)[0, 0].tolist() == [10, 20, 30]
  la = open_image(_save(tmp_path, "t2.png", Image.new("LA", (8, 8), (100, 0))))
  assert np.asarray(la)[0, 0].tolist() == [100, 100, 100]


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
  # Hand-worked: v / 257 rounded; 0 -> 0, 32896 -> 128, 65535 -> 255 (Pillow's convert would clip 32896 to 255).
  values = np.array([[0, 32896, 65535]], np.uint16)
  image = open_image(_save(tmp_path, "g.png", Image.fromarray(values)))
  assert np.asarray(image)[0, :, 0].tolist() == [0, 128, 255]


def test_gif_uses_first_frame(tmp_path):
  frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
  path = tmp_path / "anim.gif"
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
  assert np.asarray(open_image(path))[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(tmp_path):
  # Stored 40x20, left half red, right half blue; Orientation 6 = rotate 90 degrees clockwise for display,
  # so the displayed image is 20x40 with the stored left column on top: red above, blue below.
  arr = np.zeros((20, 40, 3), np.uint8)
  arr[:, :20] = (255, 0, 0)
  arr[:, 20:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = 6
  image = open_image(_save(tmp_path, "rot.jpg", Image.fromarray(arr), exif=exif, quality=95))
  assert image.size == (20, 40)
  pixels = np.asarray(image).astype(int)
  assert np.abs(pixels[5, 10] - (255, 0, 0)).max() < 40 and np.abs(pixels[35, 10] - (0, 0, 255)).max() < 40
  assert preprocess(image, "gundam").original_size == (20, 40)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_bytes_raise_value_error(data):
  with pytest.raises(ValueError, match="^image: cannot identify image file"):
    open_image(data)


def test_truncated_image_raises_value_error(tmp_path):
  data = _save(tmp_path, "big.jpg", Image.fromarray(
      np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8))).read_bytes()
  with pytest.raises(ValueError, match="^image:"):
    open_image(data[:len(data) // 2])


def test_missing_file_raises_value_error(tmp_path):
  with pytest.raises(ValueError, match="no such file"):
    open_image(tmp_path / "missing.png")


def _png_claiming(width, height):
  """A 1x1 PNG whose IHDR claims width x height: only the header is valid for that size."""
  buf = io.BytesIO()
  Image.new("RGB", (1, 1)).save(buf, "PNG")
  data = bytearray(buf.getvalue())
  ihdr = 8 + 8  # signature, then chunk length + type
  data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
  data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
  return bytes(data)


def test_pixel_limit_is_checked_before_decoding():
  with pytest.raises(ValueError, match="max_pixels=5000"):
    open_image(Image.new("RGB", (100, 100)), max_pixels=5000)
  # 7000x7000 = 49 MP > the 40 MP default: refused from the header (decoding would fail on the missing data).
  with pytest.raises(ValueError, match="max_pixels=40000000"):
    open_image(_png_claiming(7000, 7000))
  # Beyond Pillow's own decompression-bomb threshold, its error is mapped to a ValueError naming the limit.
  with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
    open_image(_png_claiming(100_000, 100_000), max_pixels=10**12)


def test_max_pixels_is_validated():
  with pytest.raises(ValueError, match="max_pixels"):
    open_image(Image.new("RGB", (4, 4)), max_pixels=0)


def test_32_bit_greyscale_is_rescaled_only_above_8_bits():
  wide = open_image(Image.fromarray(np.array([[0, 32896, 65535]], np.int32)))
  assert wide.mode == "RGB" and np.asarray(wide)[0, :, 1].tolist() == [0, 128, 255]
  narrow = open_image(Image.fromarray(np.array([[0, 100, 255]], np.int32)))
  assert np.asarray(narrow)[0, :, 1].tolist() == [0, 100, 255]
