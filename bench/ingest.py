"""Benchmark: ingest's image processing against a naive Pillow pipeline, on large JPEGs.

    ./start.sh bench ingest [--quick] [--json] [--max-dimension N] [--repeat N] [--sizes WxH,...]

The benchmark generates large JPEGs (8K and bigger; ``--sizes`` names others) in a temporary directory,
then runs each pipeline over the whole set in a process of its own and
reports that process's peak RSS (``ru_maxrss``) and images per second:

* ``ours``: :func:`shared.images.process_image` (lazy open, JPEG ``draft()``
  at the coarsest scale that keeps MAX_IMAGE_DIMENSION, then ``thumbnail``,
  re-encode);
* ``naive``: ``Image.open(path).load()``, then ``resize`` to fit the same
  limit (the same bicubic filter) and the same JPEG encode;
* ``ours+gc``: ours with ``gc.collect()`` after every image, to see whether
  the seed's "gc.collect() every 10 messages" buys anything.

Then the memory ceiling (INGEST_MEMORY_BUDGET_MB, ``--budget-mb``, default
256): an 8000x8000 RGBA PNG and a 12000x9000 JPEG, each processed alone in a
process of its own, with the budget (``ours``) and without it (``no-budget``,
ingest's pipeline before the ceiling existed), peak RSS against the budget
and what became of the image (stored at which size, or skipped and why).
These four runs go two at a time: they report no speed, and a process's
peak RSS is its own.

Prints a table; with ``--json`` the last line is one JSON object with
``rss_ratio`` (ours/naive peak RSS), ``speed_ratio`` (ours/naive images per
second), ``budget_mb``, ``peak_rss_mb`` (the largest peak RSS of ``ours``
over the large-image cases), ``large_images`` (per case) and the raw
numbers. A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/ingest.py`, this directory would come first on sys.path and
# shadow the repository's ingest.py: put the repository root first instead.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import argparse  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from bench._common import machine, machine_line  # noqa: E402

from shared.config import BY_NAME  # noqa: E402

logger = logging.getLogger("bench.ingest")

DEFAULT_BUDGET_MB = int(BY_NAME["INGEST_MEMORY_BUDGET_MB"].default)

FULL_SIZES = [(8192, 6144), (12000, 9000), (16000, 12000), (16384, 16384)]
QUICK_SIZES = [(8192, 6144), (12000, 9000)]
VARIANTS = ("ours", "naive", "ours+gc")
#: The memory-ceiling cases: a PNG cannot be decoded at reduced scale, a JPEG can.
LARGE_PNG = (8000, 8000)
LARGE_JPEG = (12000, 9000)
BUDGET_VARIANTS = ("ours", "no-budget")
#: Peak RSS the memory ceiling aims at: the budget plus the interpreter, Pillow and our modules.
HEADROOM_MB = 100


@dataclass
class Run:
    variant: str
    images: int
    seconds: float
    peak_rss_kb: int
    baseline_rss_kb: int
    sizes_out: list[tuple[int, int]]
    skipped: list[str] = field(default_factory=list)

    def outcome(self) -> str:
        """What became of a single image: ``stored WxH`` or ``skipped: <reason>``."""
        if self.sizes_out:
            width, height = self.sizes_out[0]
            return f"stored {width}x{height}"
        return f"skipped: {self.skipped[0]}" if self.skipped else "nothing"

    @property
    def per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")

    @property
    def peak_mb(self) -> float:
        return self.peak_rss_kb / 1024


# --- the child: one pipeline over the files, in its own process --------------------------


def peak_rss_kb() -> int:
    """This process's peak RSS in KB: ``VmHWM`` on Linux (``ru_maxrss`` there would also count
    what the parent held when it forked), ``ru_maxrss`` elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    scale = 1024 if sys.platform == "darwin" else 1  # macOS reports bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale


def _naive(path: Path, max_dimension: int) -> tuple[int, int]:
    from PIL import Image

    from shared.images import fit_within

    Image.MAX_IMAGE_PIXELS = None  # naive: no bomb limit (Pillow's default would refuse the biggest image)
    image = Image.open(path)
    image.load()
    size = fit_within(image.width, image.height, max_dimension)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return image.size


def _ours(path: Path, max_dimension: int, budget_mb: int | None) -> tuple[int, int]:
    from shared.images import MB, ImagePolicy, process_image

    policy = ImagePolicy(max_dimension=max_dimension, memory_budget=None if budget_mb is None else budget_mb * MB)
    result = process_image(path, policy=policy)
    return result.width, result.height


def child(variant: str, files: list[Path], max_dimension: int, repeat: int, budget_mb: int) -> dict[str, Any]:
    import PIL.Image  # noqa: F401 - imported before the baseline is taken, for both variants alike

    import shared.images  # noqa: F401
    from shared.images import ImageRejected

    baseline = peak_rss_kb()
    sizes: list[tuple[int, int]] = []
    skipped: list[str] = []
    started = time.perf_counter()
    for _ in range(repeat):
        for path in files:
            try:
                if variant == "naive":
                    sizes.append(_naive(path, max_dimension))
                else:
                    sizes.append(_ours(path, max_dimension, None if variant == "no-budget" else budget_mb))
            except ImageRejected as rejected:
                skipped.append(str(rejected))
            if variant == "ours+gc":
                gc.collect()
    seconds = time.perf_counter() - started
    return {
        "variant": variant,
        "images": len(sizes) + len(skipped),
        "seconds": seconds,
        "peak_rss_kb": peak_rss_kb(),
        "baseline_rss_kb": baseline,
        "sizes_out": sizes,
        "skipped": skipped,
    }


# --- the parent: make the images, run each variant, compare ---------------------------------


def generate(directory: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """Large JPEGs with detail (gradients and shapes), so decoding and encoding do real work."""
    from PIL import Image, ImageDraw

    files = []
    for number, (width, height) in enumerate(sizes):
        path = directory / f"large-{width}x{height}.jpg"
        tile = Image.linear_gradient("L").resize((512, 512)).convert("RGB")
        image = tile.resize((width, height), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(image)
        step = max(64, width // 40)
        for index, x in enumerate(range(0, width, step)):
            draw.rectangle((x, (index * 97) % height, x + step // 2, height), fill=((index * 37 + number * 50) % 256, 90, 160))
        image.save(path, "JPEG", quality=85)
        del image, draw
        files.append(path)
        logger.info("generated %s (%.1f MB)", path.name, path.stat().st_size / 1e6)
    return files


def generate_png(directory: Path, size: tuple[int, int] = LARGE_PNG) -> Path:
    """A large RGBA PNG (gradients in every channel, alpha included), quick to write."""
    from PIL import Image

    width, height = size
    path = directory / f"large-{width}x{height}-rgba.png"
    ramp = Image.linear_gradient("L").resize((width, height), Image.Resampling.NEAREST)
    image = Image.merge("RGBA", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp.transpose(Image.Transpose.FLIP_TOP_BOTTOM), ramp))
    del ramp
    image.save(path, "PNG", compress_level=1)
    del image
    logger.info("generated %s (%.1f MB)", path.name, path.stat().st_size / 1e6)
    return path


def run_variant(variant: str, files: list[Path], max_dimension: int, repeat: int, budget_mb: int = 0) -> Run:
    done = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--max-dimension", str(max_dimension), "--repeat", str(repeat),
         "--budget-mb", str(budget_mb), *map(str, files)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{done.stderr[-3000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return Run(
        variant=data["variant"],
        images=data["images"],
        seconds=data["seconds"],
        peak_rss_kb=data["peak_rss_kb"],
        baseline_rss_kb=data["baseline_rss_kb"],
        sizes_out=[tuple(s) for s in data["sizes_out"]],
        skipped=list(data.get("skipped", [])),
    )


def large_cases(directory: Path, jpeg: Path, max_dimension: int, budget_mb: int) -> list[dict[str, Any]]:
    """Each large image alone, with and without the budget, each run in a process of its own.

    Two at a time (the PNG is made meanwhile): these runs report each process's own peak RSS
    and what became of the image, never a speed, so running beside another changes neither.
    """
    with ThreadPoolExecutor(max_workers=2) as pool:
        png = pool.submit(generate_png, directory)
        jpeg_runs = {variant: pool.submit(run_variant, variant, [jpeg], max_dimension, 1, budget_mb) for variant in BUDGET_VARIANTS}
        png_path = png.result()
        png_runs = {variant: pool.submit(run_variant, variant, [png_path], max_dimension, 1, budget_mb) for variant in BUDGET_VARIANTS}
        done = {
            f"png {LARGE_PNG[0]}x{LARGE_PNG[1]} RGBA": {v: f.result() for v, f in png_runs.items()},
            f"jpeg {LARGE_JPEG[0]}x{LARGE_JPEG[1]}": {v: f.result() for v, f in jpeg_runs.items()},
        }
    cases = []
    for name, runs in done.items():
        ours, before = runs["ours"], runs["no-budget"]
        cases.append({
            "case": name,
            "peak_rss_mb": round(ours.peak_mb, 1),
            "no_budget_peak_rss_mb": round(before.peak_mb, 1),
            "outcome": ours.outcome(),
            "no_budget_outcome": before.outcome(),
        })
    return cases


def parse_sizes(parser: argparse.ArgumentParser, text: str) -> list[tuple[int, int]]:
    """``8192x6144,12000x9000`` as [(8192, 6144), (12000, 9000)]; a usage error otherwise."""
    sizes = []
    for item in text.split(","):
        width, _, height = item.strip().lower().partition("x")
        if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
            parser.error(f"--sizes takes WxH,... (got {text!r})")
        sizes.append((int(width), int(height)))
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./start.sh bench ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two images up to 12000x9000 instead of four up to 16384x16384")
    parser.add_argument("--sizes", default=None,
                        help="the JPEGs of the speed comparison, WxH,... (default: four up to 16384x16384; two with --quick)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--max-dimension", type=int, default=8192, help="MAX_IMAGE_DIMENSION (default 8192)")
    parser.add_argument("--repeat", type=int, default=1, help="passes over the set per variant")
    parser.add_argument("--budget-mb", type=int, default=DEFAULT_BUDGET_MB,
                        help=f"INGEST_MEMORY_BUDGET_MB (default {DEFAULT_BUDGET_MB})")
    parser.add_argument("--child", choices=VARIANTS + BUDGET_VARIANTS[1:], help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        sys.stdout.write(json.dumps(child(args.child, args.files, args.max_dimension, args.repeat, args.budget_mb)) + "\n")
        return 0

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sizes = parse_sizes(parser, args.sizes) if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    directory = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        files = generate(directory, sizes)
        runs = {variant: run_variant(variant, files, args.max_dimension, args.repeat, args.budget_mb) for variant in VARIANTS}
        jpeg = next((f for f, size in zip(files, sizes, strict=True) if size == LARGE_JPEG), None)
        if jpeg is None:
            jpeg = generate(directory, [LARGE_JPEG])[0]
        large = large_cases(directory, jpeg, args.max_dimension, args.budget_mb)
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    ours, naive, with_gc = runs["ours"], runs["naive"], runs["ours+gc"]
    where = machine()
    print(machine_line(where))
    print(f"{len(files)} JPEGs ({', '.join(f'{w}x{h}' for w, h in sizes)}), MAX_IMAGE_DIMENSION={args.max_dimension}, "
          f"{args.repeat} pass(es), each variant in its own process")
    print(f"{'variant':<10} {'images/s':>9} {'seconds':>8} {'peak RSS MB':>12} {'baseline MB':>12}  output sizes")
    for run in runs.values():
        outs = ", ".join(f"{w}x{h}" for w, h in run.sizes_out[: len(files)])
        print(f"{run.variant:<10} {run.per_s:>9.2f} {run.seconds:>8.2f} {run.peak_mb:>12.1f} {run.baseline_rss_kb / 1024:>12.1f}  {outs}")
    result = {
        "rss_ratio": round(ours.peak_rss_kb / naive.peak_rss_kb, 4),
        "speed_ratio": round(ours.per_s / naive.per_s, 4),
        "ours_peak_rss_mb": round(ours.peak_mb, 1),
        "naive_peak_rss_mb": round(naive.peak_mb, 1),
        "ours_images_per_s": round(ours.per_s, 3),
        "naive_images_per_s": round(naive.per_s, 3),
        "gc_peak_rss_mb": round(with_gc.peak_mb, 1),
        "gc_rss_ratio": round(with_gc.peak_rss_kb / ours.peak_rss_kb, 4),
        "gc_speed_ratio": round(with_gc.per_s / ours.per_s, 4),
        "images": len(files) * args.repeat,
        "sizes": [f"{w}x{h}" for w, h in sizes],
        "max_dimension": args.max_dimension,
        "machine": where,
    }
    peak = max(case["peak_rss_mb"] for case in large)
    ceiling = args.budget_mb + HEADROOM_MB
    result.update({
        "budget_mb": args.budget_mb,
        "peak_rss_mb": peak,
        "ceiling_mb": ceiling,
        "within_ceiling": peak <= ceiling,
        "large_images": large,
    })
    print(f"memory ceiling: INGEST_MEMORY_BUDGET_MB={args.budget_mb}, aim: peak RSS <= {ceiling} MB (budget + {HEADROOM_MB})")
    print(f"{'case':<22} {'peak RSS MB':>12} {'no budget MB':>13}  outcome (with the budget | without)")
    for case in large:
        print(f"{case['case']:<22} {case['peak_rss_mb']:>12.1f} {case['no_budget_peak_rss_mb']:>13.1f}  "
              f"{case['outcome']} | {case['no_budget_outcome']}")
    print(f"ours/naive: peak RSS x{result['rss_ratio']:.2f}, speed x{result['speed_ratio']:.2f}; "
          f"gc.collect() after every image: peak RSS x{result['gc_rss_ratio']:.2f}, speed x{result['gc_speed_ratio']:.2f} of ours")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
