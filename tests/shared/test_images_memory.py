"""The ingest memory ceiling (INGEST_MEMORY_BUDGET_MB): images are decoded within it or skipped with a reason naming it.

The large-image cases run :func:`shared.images.process_image` in a process of
their own while this test samples that process's RSS with psutil; the peak
measured is compared to the budget plus 100 MB (the interpreter, Pillow and
our modules). The images are the issue's: an 8000x8000 RGBA PNG (no reduced
decoding exists for PNG) and a 12000x9000 JPEG (decoded at reduced scale).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import psutil
import pytest

from ingest import image_policy
from shared.config import IngestSettings, load_settings
from shared.images import MB, ImagePolicy, ImageRejected, RejectReason, process_image, working_memory
from tests.fixtures.once import once

ROOT = Path(__file__).resolve().parent.parent.parent
BUDGET_MB = 256
CEILING_MB = BUDGET_MB + 100

CHILD = """
import json, sys
from pathlib import Path
from shared.images import MB, ImagePolicy, ImageRejected, process_image
policy = ImagePolicy(max_dimension=8192, memory_budget=int(sys.argv[2]) * MB)
try:
    image = process_image(Path(sys.argv[1]), policy=policy)
    print(json.dumps({"stored": [image.width, image.height]}))
except ImageRejected as rejected:
    print(json.dumps({"skipped": rejected.reason.value, "detail": rejected.detail}))
"""


def png_header(width: int, height: int, color_type: int = 6) -> bytes:
    """A PNG that claims ``width`` x ``height`` (RGBA by default) and carries no pixels: enough for a header check."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_the_estimate_counts_the_decoded_pixels_a_working_copy_and_the_encoded_output() -> None:
    # Pillow keeps RGB and RGBA at 4 bytes per pixel, grey at 1; PNG output may be as large as the pixels.
    assert working_memory(8000, 8000, "RGBA", "PNG", max_dimension=8192, reoriented=False) == 2 * 8000 * 8000 * 4
    assert working_memory(8000, 8000, "L", "PNG", max_dimension=8192) == 3 * 8000 * 8000
    # A JPEG kept as it is needs no copy, and its encoded output takes at most a byte per pixel.
    assert working_memory(8192, 6144, "RGB", "JPEG", max_dimension=8192, reoriented=False) == 8192 * 6144 * 5
    # Downscaled: the decoded pixels, the smaller copy and its encoding.
    assert working_memory(16000, 4000, "RGB", "JPEG", max_dimension=8192) == 16000 * 4000 * 4 + 8192 * 2048 * 5


def test_a_png_over_the_budget_is_refused_from_its_header_with_a_reason_naming_the_budget() -> None:
    with pytest.raises(ImageRejected) as refused:
        process_image(png_header(8000, 8000), policy=ImagePolicy(memory_budget=BUDGET_MB * MB))

    assert refused.value.reason is RejectReason.MEMORY_BUDGET and not refused.value.reason.is_failure
    assert refused.value.detail == "8000x8000 PNG needs about 488 MB to decode and process, more than INGEST_MEMORY_BUDGET_MB=256"


def test_ingest_takes_its_budget_from_the_setting(tmp_path: Path) -> None:
    default = image_policy(load_settings(IngestSettings, {"DATA_DIR": str(tmp_path)}))
    raised = image_policy(load_settings(IngestSettings, {"DATA_DIR": str(tmp_path), "INGEST_MEMORY_BUDGET_MB": "512"}))
    assert (default.memory_budget, raised.memory_budget) == (256 * MB, 512 * MB)


# --- the large images, measured -------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The issue's two images, written once per run by the benchmark's generators in a process of their own."""

    def write(directory: Path) -> dict[str, str]:
        code = (
            "import sys; from pathlib import Path; from bench.ingest import LARGE_JPEG, generate, generate_png; "
            "d = Path(sys.argv[1]); print(generate_png(d)); print(generate(d, [LARGE_JPEG])[0])"
        )
        done = subprocess.run([sys.executable, "-c", code, str(directory)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        png, jpeg = done.stdout.split()
        return {"png": png, "jpeg": jpeg}

    return {kind: Path(path) for kind, path in once(tmp_path_factory, "large-images", write).items()}


def process_measured(path: Path, budget_mb: int, *, timeout: float = 120.0) -> tuple[float, dict[str, Any]]:
    """Run process_image on ``path`` in a child process; (its peak RSS in MB as sampled, what it printed)."""
    proc = psutil.Popen([sys.executable, "-c", CHILD, str(path), str(budget_mb)], cwd=ROOT,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"processing {path.name} took more than {timeout} s")
        time.sleep(0.002)  # the sampling period: a peak lasting less than this could be missed
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    return peak / MB, json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_an_8000x8000_rgba_png_is_skipped_naming_the_budget_and_peak_rss_stays_under_budget_plus_100_mb(
    large_images: dict[str, Path],
) -> None:
    peak_mb, result = process_measured(large_images["png"], BUDGET_MB)

    assert result["skipped"] == "memory_budget" and f"INGEST_MEMORY_BUDGET_MB={BUDGET_MB}" in result["detail"]
    assert peak_mb <= CEILING_MB, f"peak RSS {peak_mb:.0f} MB"


@pytest.mark.slow
def test_a_12000x9000_jpeg_is_decoded_at_reduced_scale_and_peak_rss_stays_under_budget_plus_100_mb(
    large_images: dict[str, Path],
) -> None:
    peak_mb, result = process_measured(large_images["jpeg"], BUDGET_MB)

    assert result["stored"] == [6000, 4500]
    assert peak_mb <= CEILING_MB, f"peak RSS {peak_mb:.0f} MB"


@pytest.mark.slow
def test_a_budget_large_enough_for_the_png_stores_it_and_stays_under_that_budget_plus_100_mb(
    large_images: dict[str, Path],
) -> None:
    peak_mb, result = process_measured(large_images["png"], 512)

    assert result["stored"] == [8000, 8000]
    assert peak_mb <= 512 + 100, f"peak RSS {peak_mb:.0f} MB"
