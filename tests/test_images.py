"""Finding image files in NIH's layouts and decoding them, bad files included."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from cxrlearn.data.decoding.images import attach_images, check_images, find_images, load_grayscale
from cxrlearn.errors import DataError


@pytest.fixture(scope="module")
def sample_names(sample_images) -> list[str]:
    return sorted(p.name for p in sample_images.glob("*.png"))


@pytest.fixture()
def real_png(sample_images, sample_names):
    path = sample_images / sample_names[0]
    return path, np.asarray(Image.open(path))


def test_flat_folder(sample_images, sample_names):
    found = find_images(sample_images)
    assert len(found) == len(sample_names) == 1_115
    assert found[sample_names[0]] == sample_images / sample_names[0]


def test_archive_layout(tmp_path, sample_images, sample_names):
    # As the 12 archives unpack: images_001/images/..., images_002/images/...
    for i, name in enumerate(sample_names[:30]):
        folder = tmp_path / f"images_{1 + i % 3:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(sample_images / name, folder / name)
    (tmp_path / "images_001" / "images" / "notes.txt").write_text("not an image")
    found = find_images(tmp_path)
    assert sorted(found) == sample_names[:30]
    assert found[sample_names[1]] == tmp_path / "images_002" / "images" / sample_names[1]


def test_same_image_in_two_places(tmp_path, sample_images, sample_names):
    for folder in ("images_001/images", "images_002/images"):
        (tmp_path / folder).mkdir(parents=True)
        shutil.copy(sample_images / sample_names[0], tmp_path / folder)
    with pytest.raises(DataError, match=rf"image '{sample_names[0]}' is in two places"):
        find_images(tmp_path)


def test_attach_images_counts_and_paths(nih_table, sample_images):
    presence = attach_images(nih_table, sample_images)
    assert (presence.n_listed, presence.n_present) == (112_120, 1_115)
    assert "1,115 of the table's 112,120 images are present" in presence.summary()
    assert all(os.path.basename(p) == n for p, n in zip(presence.table["path"], presence.table["image"]))
    # Labels stay attached to their own image.
    merged = presence.table.set_index("image")
    assert merged.loc["00000001_000.png", "Cardiomegaly"] == 1


def test_no_image_present_is_a_clear_error(nih_table, tmp_path):
    (tmp_path / "scan.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"none of the table's 112,120 images is in .*found 1 image files"):
        attach_images(nih_table, tmp_path)
    with pytest.raises(DataError, match=r"does not exist"):
        attach_images(nih_table, tmp_path / "missing")


def test_8bit_grayscale_is_unchanged(real_png):
    path, pixels = real_png
    decoded = load_grayscale(path)
    assert decoded.dtype == np.uint8 and decoded.shape == (256, 256)
    np.testing.assert_array_equal(decoded, pixels)


def test_16bit_png_is_scaled_over_full_range(tmp_path, real_png):
    path, pixels = real_png
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(pixels.astype(np.uint16) * 257).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I")
    np.testing.assert_array_equal(load_grayscale(sixteen), pixels)


def test_rgba_and_rgb(tmp_path, real_png):
    path, pixels = real_png
    opaque = np.dstack([pixels, pixels, pixels, np.full_like(pixels, 255)])
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(load_grayscale(tmp_path / "opaque.png"), pixels)
    clear = opaque.copy()
    clear[:128, :, 3] = 0  # top half transparent -> black
    Image.fromarray(clear, "RGBA").save(tmp_path / "clear.png")
    decoded = load_grayscale(tmp_path / "clear.png")
    assert (decoded[:128] == 0).all()
    np.testing.assert_array_equal(decoded[128:], pixels[128:])
    Image.fromarray(opaque[..., :3], "RGB").save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_grayscale(tmp_path / "rgb.png"), pixels)


def test_bad_files_name_the_file(tmp_path, real_png):
    path, _ = real_png
    data = path.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"truncated\.png: cannot decode image"):
        load_grayscale(truncated)
    text = tmp_path / "report.png"
    text.write_text("Impression: no acute disease.")
    with pytest.raises(DataError, match=r"report\.png: not an image file"):
        load_grayscale(text)
    with pytest.raises(DataError, match=r"gone\.png: no such image file"):
        load_grayscale(tmp_path / "gone.png")


def test_check_images_lists_only_the_bad_ones(tmp_path, sample_images, sample_names):
    good = [sample_images / n for n in sample_names[:5]]
    bad = tmp_path / "00000000_000.png"
    bad.write_bytes(good[0].read_bytes()[:300])
    failures = check_images(good + [bad], progress=False)
    assert [p for p, _ in failures] == [str(bad)]
    assert "cannot decode image" in failures[0][1]


def test_images_too_small_to_be_radiographs_and_broken_links_are_named(sample_images, tmp_path, caplog):
    from PIL import Image

    from cxrlearn.data.decoding.images import find_images, load_grayscale
    from cxrlearn.errors import DataError

    for size in ((1, 1), (2, 2048)):
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("L", size).save(path)
        with pytest.raises(DataError, match="too small to be a radiograph"):
            load_grayscale(path)
    folder = tmp_path / "links"
    folder.mkdir()
    real = sorted(sample_images.glob("*.png"))[0]
    (folder / real.name).symlink_to(real)
    (folder / "00000002_000.png").symlink_to(tmp_path / "gone.png")
    assert list(find_images(folder)) == [real.name]
    assert "point nowhere and are skipped" in caplog.text


def test_grayscale_pngs_decode_to_pillows_pixels_through_the_fast_decoder(data_dir, tmp_path, real_png):
    """Grayscale PNGs are decoded by OpenCV (libpng: a quarter faster at 1,024 px): the very pixels Pillow gives,
    on every sample image at both sizes, 16-bit and interlaced files; a file damaged in its pixel data is still a
    DataError naming it."""
    from cxrlearn.data.decoding import images

    paths = sorted((data_dir / "nih-sample").glob("images-*/*.png"))
    assert len(paths) == 1_115 + 48
    for path in paths:
        with Image.open(path) as image:
            assert image.mode == "L" and images._gray_png_with_opencv(path.read_bytes(), image) is not None
            np.testing.assert_array_equal(load_grayscale(path), np.asarray(image), err_msg=str(path))
    path, pixels = real_png
    for options in ({}, {"interlace": 1}):  # interlaced files stay with Pillow
        sixteen = tmp_path / f"sixteen{len(options)}.png"
        Image.fromarray(pixels.astype(np.uint16) * 257 + 100).save(sixteen, **options)
        np.testing.assert_array_equal(load_grayscale(sixteen), pixels)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of the compressed pixels: libpng refuses it, Pillow names it
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"damaged\.png: cannot decode image"):
        load_grayscale(damaged)
