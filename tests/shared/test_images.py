"""Image processing: lazy, scaled decoding, bombs refused, orientation applied, metadata stripped."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from shared.images import (
    ImagePolicy,
    ImageRejected,
    OversizePolicy,
    RejectReason,
    choose_draft_scale,
    fit_within,
    probe,
    process_image,
)
from devkit.sandbox import ImageKind
from devkit.sandbox._media import generate

ROOT = Path(__file__).resolve().parents[2]
ORIENTATION = 0x0112
MAKE = 0x010F


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def pattern(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    image = Image.linear_gradient("L").resize(size)
    return image.convert(mode)


@pytest.mark.parametrize(("kind", "fmt", "mime"), [
    (ImageKind.JPEG, "JPEG", "image/jpeg"),
    (ImageKind.PNG, "PNG", "image/png"),
    (ImageKind.WEBP, "WEBP", "image/webp"),
])
def test_ordinary_images_keep_their_format_and_size(kind: ImageKind, fmt: str, mime: str) -> None:
    data = generate(kind, 1)

    result = process_image(data, policy=ImagePolicy())

    assert result.mime == mime and result.source_format == fmt
    assert (result.width, result.height) == Image.open(io.BytesIO(data)).size
    assert not result.resized and result.draft_scale == 1
    assert result.sha256 == hashlib.sha256(result.data).hexdigest()
    with Image.open(io.BytesIO(result.data)) as stored:
        assert stored.format == fmt
        stored.load()


def test_an_untouched_jpeg_is_reencoded_with_its_own_quantization_tables() -> None:
    data = encode(pattern((320, 240)), "JPEG", quality=55)

    result = process_image(data, policy=ImagePolicy(quality=95))

    assert result.reencoded_untouched
    with Image.open(io.BytesIO(data)) as before, Image.open(io.BytesIO(result.data)) as after:
        assert after.quantization == before.quantization


def test_a_large_jpeg_is_decoded_at_reduced_scale_and_fits_the_limit() -> None:
    data = encode(pattern((4000, 3000)), "JPEG", quality=80)

    result = process_image(data, policy=ImagePolicy(max_dimension=1800))

    assert result.draft_scale == 2  # 2000x1500 decoded: still at least 1800 on the long side
    assert (result.width, result.height) == (1800, 1350) and result.resized
    assert (result.source_width, result.source_height) == (4000, 3000)


def test_a_large_png_is_downscaled_after_a_full_decode_within_budget() -> None:
    data = encode(pattern((1200, 800), "RGBA"), "PNG")

    result = process_image(data, policy=ImagePolicy(max_dimension=1000))

    assert (result.width, result.height) == (1000, 667) and result.mime == "image/png"


def test_oversize_images_are_skipped_when_the_policy_says_skip() -> None:
    data = encode(pattern((1200, 800)), "JPEG")

    with pytest.raises(ImageRejected) as rejected:
        process_image(data, policy=ImagePolicy(max_dimension=1000, oversize=OversizePolicy.SKIP))

    assert rejected.value.reason is RejectReason.OVERSIZE and not rejected.value.reason.is_failure
    assert "1200x800" in str(rejected.value)


def test_a_non_jpeg_above_the_decode_budget_is_refused_before_decoding() -> None:
    data = encode(pattern((30, 30)), "PNG")  # 900 pixels: budget 16*16=256, header limit 32*32=1024

    with pytest.raises(ImageRejected) as rejected:
        process_image(data, policy=ImagePolicy(max_dimension=16))

    assert rejected.value.reason is RejectReason.TOO_MANY_PIXELS


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    with pytest.raises(ImageRejected) as rejected:
        process_image(generate(ImageKind.BOMB), policy=ImagePolicy())

    assert rejected.value.reason is RejectReason.DECOMPRESSION_BOMB
    assert "400000000 pixels" in rejected.value.detail  # the header's pixel count, in Pillow's words or ours


def test_a_header_above_the_policys_limit_is_refused_by_our_own_check_before_decoding() -> None:
    data = encode(pattern((40, 40)), "PNG")  # 1600 pixels: header limit of max_dimension 16 is 32*32 = 1024

    with pytest.raises(ImageRejected) as rejected:
        process_image(data, policy=ImagePolicy(max_dimension=16))
    with pytest.raises(ImageRejected) as probed:
        probe(data, max_dimension=16)

    assert rejected.value.reason is RejectReason.DECOMPRESSION_BOMB and not rejected.value.reason.is_failure
    assert "40x40 (1600 pixels) is more than the 1024 pixels allowed" in rejected.value.detail
    assert probed.value.reason is RejectReason.DECOMPRESSION_BOMB


def test_policies_with_different_limits_in_one_process_do_not_affect_each_other() -> None:
    """Pillow's process-wide limit is never lowered by a small policy, and each call judges by its own."""
    small, large = ImagePolicy(max_dimension=16), ImagePolicy(max_dimension=64)  # header limits 1024 and 16384
    data = encode(pattern((40, 40)), "PNG")  # 1600 pixels: a bomb for the small policy, fine for the large one
    before = Image.MAX_IMAGE_PIXELS

    for _ in range(2):
        assert process_image(data, policy=large).width == 40
        assert probe(data, max_dimension=64).width == 40
        with pytest.raises(ImageRejected) as rejected:
            process_image(data, policy=small)
        assert rejected.value.reason is RejectReason.DECOMPRESSION_BOMB

    assert Image.MAX_IMAGE_PIXELS == before, "the small policy left Pillow's process-wide limit alone"
    with Image.open(io.BytesIO(data)) as plain:
        plain.load()  # Pillow used directly in the same process is not held to a policy's limit


def test_a_header_the_policy_allows_is_judged_by_the_policy_not_by_pillows_default_limit() -> None:
    """In a fresh process (Pillow's default limit refuses above 178956970 pixels): a 16000x12000 PNG
    header (192 M pixels) is within the default policy's 268 M, so our rules judge it (too_many_pixels
    for a PNG), and an explicitly generous policy raises Pillow's net without lowering it later."""
    code = (
        "import io, json, zlib\n"
        "from PIL import Image\n"
        "from shared.images import ImagePolicy, ImageRejected, process_image\n"
        "def chunk(kind, data):\n"
        "    return len(data).to_bytes(4, 'big') + kind + data + zlib.crc32(kind + data).to_bytes(4, 'big')\n"
        "ihdr = (16000).to_bytes(4, 'big') + (12000).to_bytes(4, 'big') + bytes([8, 0, 0, 0, 0])\n"
        "png = b'\\x89PNG\\r\\n\\x1a\\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\\x00' * 16001)) + chunk(b'IEND', b'')\n"
        "default = Image.MAX_IMAGE_PIXELS\n"
        "reasons = []\n"
        "for policy in (ImagePolicy(), ImagePolicy(max_dimension=16)):\n"
        "    try:\n"
        "        process_image(png, policy=policy)\n"
        "    except ImageRejected as exc:\n"
        "        reasons.append(exc.reason.value)\n"
        "print(json.dumps({'default': default, 'after': Image.MAX_IMAGE_PIXELS, 'reasons': reasons}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert 2 * report["default"] < 16000 * 12000, "Pillow's default alone would call this header a bomb"
    assert report["reasons"] == ["too_many_pixels", "decompression_bomb"]
    assert report["after"] == (2 * 8192) ** 2, "raised for the default policy, not lowered by the small one"


def test_the_20000x20000_bomb_is_refused_with_memory_bounded() -> None:
    """In a fresh process: peak RSS stays far below the 400 MB one decode would take."""
    code = (
        "import json, resource, sys\n"
        "from shared.images import ImagePolicy, ImageRejected, process_image\n"
        "from devkit.sandbox._media import generate, ImageKind\n"
        "data = generate(ImageKind.BOMB)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    process_image(data, policy=ImagePolicy())\n"
        "    reason = detail = None\n"
        "except ImageRejected as exc:\n"
        "    reason, detail = exc.reason.value, exc.detail\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'reason': reason, 'detail': detail, 'base_kb': base, 'peak_kb': peak}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert report["reason"] == "decompression_bomb"
    assert report["detail"].startswith("20000x20000 (400000000 pixels) is more than the 268435456 pixels allowed")
    assert report["peak_kb"] - report["base_kb"] < 32 * 1024


def test_a_truncated_file_fails_with_pillows_reason() -> None:
    with pytest.raises(ImageRejected) as rejected:
        process_image(generate(ImageKind.CORRUPT), policy=ImagePolicy())

    assert rejected.value.reason is RejectReason.CORRUPT and rejected.value.reason.is_failure
    assert "truncated" in rejected.value.detail


def test_a_pdf_is_not_an_image() -> None:
    with pytest.raises(ImageRejected) as rejected:
        process_image(generate(ImageKind.PDF), policy=ImagePolicy())

    assert rejected.value.reason is RejectReason.NOT_AN_IMAGE


def _portrait_exif_jpeg() -> bytes:
    image = Image.new("RGB", (60, 40), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, 30, 40))  # left half blue
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored landscape, shown rotated 90 degrees clockwise
    exif[MAKE] = "TestCam"
    return encode(image, "JPEG", exif=exif.tobytes(), comment=b"secret comment", quality=95)


def test_exif_orientation_is_applied_and_metadata_is_stripped() -> None:
    result = process_image(_portrait_exif_jpeg(), policy=ImagePolicy())

    assert (result.width, result.height) == (40, 60)
    with Image.open(io.BytesIO(result.data)) as stored:
        assert len(stored.getexif()) == 0
        assert "comment" not in stored.info
        top = stored.convert("RGB").getpixel((20, 5))
        assert top[2] > 150 and top[0] < 100  # the blue half is on top after rotating


def test_keep_exif_keeps_the_metadata_but_not_the_applied_orientation() -> None:
    result = process_image(_portrait_exif_jpeg(), policy=ImagePolicy(keep_exif=True))

    with Image.open(io.BytesIO(result.data)) as stored:
        exif = stored.getexif()
        assert exif.get(MAKE) == "TestCam"
        assert exif.get(ORIENTATION, 1) == 1
        assert stored.size == (40, 60)


def test_other_formats_are_stored_as_png() -> None:
    gif = encode(pattern((50, 40), "L").convert("P"), "GIF")

    result = process_image(gif, policy=ImagePolicy())

    assert result.mime == "image/png" and result.extension == ".png" and result.source_format == "GIF"


def test_probe_reads_only_the_header() -> None:
    info = probe(generate(ImageKind.LARGE))

    assert (info.format, info.width, info.height) == ("JPEG", 9000, 6000)


def test_images_can_be_read_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(generate(ImageKind.JPEG))

    assert process_image(path, policy=ImagePolicy()).width == 1280


@pytest.mark.parametrize(("size", "limit", "expected"), [
    ((9000, 6000), 8192, 1),  # halving would lose resolution that is kept
    ((16384, 12288), 8192, 2),
    ((16000, 12000), 8192, 2),  # 1/1 is over the budget; 8000 on the long side is close enough
    ((40000, 1000), 8192, 4),
    ((100, 100), 8192, 1),
])
def test_draft_scale_keeps_the_resolution_that_is_kept_within_the_budget(
    size: tuple[int, int], limit: int, expected: int
) -> None:
    assert choose_draft_scale(*size, max_dimension=limit, budget=limit * limit) == expected


def test_fit_within_keeps_the_aspect_ratio() -> None:
    assert fit_within(9000, 6000, 8192) == (8192, 5461)
    assert fit_within(100, 50, 8192) == (100, 50)
