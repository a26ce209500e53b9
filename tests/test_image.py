import io

import numpy as np
import pytest
from conftest import sample_maker
from PIL import Image

from alexnet_pipeline.image import BadImage, center_square, decode_rgb, pil_flavour, prepare

KEPT = [kind for _, kind, kept in sample_maker.QUIRKS if kept]
DROPPED = [kind for _, kind, kept in sample_maker.QUIRKS if not kept]


@pytest.mark.parametrize("kind", KEPT)
def test_every_usable_quirk_becomes_a_256_baseline_rgb_jpeg(kind):
    data = sample_maker.quirk_bytes(kind, np.random.default_rng(0), 4)
    jpeg, pixels = prepare(data)
    im = Image.open(io.BytesIO(jpeg))
    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (256, 256))
    assert not im.info.get("progressive")
    assert pixels.shape == (3, 256, 256) and pixels.dtype == np.uint8  # channel planes
    # what was encoded is what decodes, up to JPEG error at quality 95
    assert np.abs(np.asarray(im, np.float64).transpose(2, 0, 1) - pixels).mean() < 8  # noisy photo, 4:2:0 chroma


@pytest.mark.parametrize("kind", DROPPED + ["stray"])
def test_unusable_files_raise_bad_image_with_a_reason(kind):
    data = b"\x00not an image" * 10 if kind == "stray" else sample_maker.quirk_bytes(kind, np.random.default_rng(0), 4)
    with pytest.raises(BadImage, match="empty|decode|not an image"):
        prepare(data)


def test_center_square_keeps_the_middle():
    im = np.zeros((300, 900, 3), np.uint8)
    im[:, 300:600] = 255  # the central 300x300 square is white, the sides black
    out = np.asarray(center_square(Image.fromarray(im), 256))
    assert out[8:-8, 8:-8].min() > 240


def test_draft_decoding_of_large_jpegs_matches_a_full_decode():
    big = sample_maker.photo(np.random.default_rng(3), 1, 4, (2400, 1800))
    data = sample_maker.jpeg(big, quality=95)
    fast = np.asarray(center_square(decode_rgb(data, 256), 256), np.float64)
    assert decode_rgb(data, 256).size[0] < 2400  # the DCT-domain shrink really happened
    full = np.asarray(center_square(Image.open(io.BytesIO(data)).convert("RGB"), 256), np.float64)
    assert np.abs(fast - full).mean() < 2.0


def test_pil_flavour_names_the_imported_pil():
    import PIL

    assert pil_flavour().endswith(PIL.__version__)
