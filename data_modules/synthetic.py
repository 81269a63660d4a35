"""A generated fine-grained dataset written in real on-disk layouts (CUB_200_2011 here).

Each image is a cluttered scene with one "bird" covering a minority of it (about 5-20 % of the area)
at a random place, scale and facing. All birds share body shapes and colours; a class is told apart
only by a small mark on the wing: its colour and its pattern (patch, stripes or dots). So, as in real
fine-grained data, the signal is a small detail of an object that must be found first.

The dataset is deterministic for its parameters and seed, written once into a cache folder and reused
(an atomic rename makes concurrent writers, e.g. DDP ranks, safe).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

MARK_COLORS = {
    "Crimson": (220, 20, 40),
    "Azure": (20, 90, 230),
    "Golden": (245, 200, 10),
    "Violet": (170, 30, 210),
    "Emerald": (10, 180, 80),
}
MARK_PATTERNS = ("Patched", "Striped", "Spotted")
MAX_CLASSES = len(MARK_COLORS) * len(MARK_PATTERNS)


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of a generated dataset (they name its cache folder)."""

    num_classes: int = 8
    images_per_class: int = 40
    test_fraction: float = 0.5
    min_side: int = 128
    max_side: int = 192
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {self.num_classes}")
        if self.images_per_class < 2:
            raise ValueError(f"images_per_class must be at least 2, got {self.images_per_class}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 64 <= self.min_side <= self.max_side:
            raise ValueError(f"need 64 <= min_side <= max_side, got {self.min_side}, {self.max_side}")

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def class_names(num_classes: int) -> list[str]:
    """``Crimson_Patched_Bird``, ``Azure_Patched_Bird``, ... (colour varies fastest)."""
    colors = list(MARK_COLORS)
    return [f"{colors[c % len(colors)]}_{MARK_PATTERNS[c // len(colors)]}_Bird" for c in range(num_classes)]


@dataclass(frozen=True)
class Scene:
    """One generated image: ``image`` (H, W, 3) uint8, ``label``, ``box`` (x1, y1, x2, y2) pixels, ``is_train``."""

    image: np.ndarray
    label: int
    box: tuple[float, float, float, float]
    is_train: bool


def render_scene(rng: np.random.Generator, label: int, spec: SyntheticSpec) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Draw one cluttered scene with a bird of class ``label``; return the image and the bird's box."""
    w, h = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, size=2))
    img = Image.fromarray(_background(rng, w, h))
    draw = ImageDraw.Draw(img)
    _clutter(rng, draw, w, h)
    box = _bird(rng, draw, w, h, label)
    return np.asarray(img), box


def _background(rng, w, h) -> np.ndarray:
    top, bottom = rng.integers(60, 200, size=(2, 3))
    t = np.linspace(0, 1, h)[:, None, None]
    grad = top[None, None] * (1 - t) + bottom[None, None] * t
    noise = rng.normal(0, 12, size=(h, w, 3))
    return np.clip(grad + noise, 0, 255).astype(np.uint8)


def _muted_color(rng) -> tuple[int, int, int]:
    # clutter is never as saturated as the class marks, so the mark must be found on the bird
    grey = rng.integers(50, 200)
    return tuple(int(np.clip(grey + d, 0, 255)) for d in rng.integers(-45, 46, size=3))


def _clutter(rng, draw, w, h) -> None:
    for _ in range(int(rng.integers(10, 18))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(3, 0.18 * w), rng.uniform(3, 0.18 * h)
        shape = rng.integers(3)
        xy = [cx - rx, cy - ry, cx + rx, cy + ry]
        if shape == 0:
            draw.ellipse(xy, fill=_muted_color(rng))
        elif shape == 1:
            draw.rectangle(xy, fill=_muted_color(rng))
        else:
            draw.line([cx - rx, cy - ry, cx + rx, cy + ry], fill=_muted_color(rng), width=int(rng.integers(1, 5)))


def _bird(rng, draw, w, h, label) -> tuple[float, float, float, float]:
    colors = list(MARK_COLORS.values())
    mark_color = colors[label % len(colors)]
    pattern = MARK_PATTERNS[label // len(colors)]
    side = min(w, h)
    bw = rng.uniform(0.30, 0.45) * side  # body width
    bh = bw * rng.uniform(0.5, 0.65)
    head_r = bh * 0.42
    total_w = bw + 2 * head_r
    x0 = rng.uniform(2, w - total_w - 2)
    y0 = rng.uniform(head_r + 2, h - bh - 2)
    facing_right = bool(rng.integers(2))
    body = [x0 + (0 if facing_right else 2 * head_r), y0, x0 + bw + (0 if facing_right else 2 * head_r), y0 + bh]
    body_color = tuple(int(v) for v in rng.integers(70, 150, size=3))
    # tail
    tail_x = body[0] if facing_right else body[2]
    tail_dir = -1 if facing_right else 1
    draw.polygon([(tail_x, y0 + 0.3 * bh), (tail_x + tail_dir * 0.25 * bw, y0 + 0.1 * bh), (tail_x + tail_dir * 0.25 * bw, y0 + 0.6 * bh)], fill=body_color)
    draw.ellipse(body, fill=body_color)
    # head and beak
    hx = body[2] + head_r * 0.4 if facing_right else body[0] - head_r * 0.4
    hy = y0 - head_r * 0.2
    draw.ellipse([hx - head_r, hy - head_r, hx + head_r, hy + head_r], fill=body_color)
    eye = hx + (0.35 if facing_right else -0.35) * head_r
    draw.ellipse([eye - 0.15 * head_r, hy - 0.3 * head_r, eye + 0.15 * head_r, hy], fill=(15, 15, 15))
    beak_dir = 1 if facing_right else -1
    draw.polygon([(hx + beak_dir * head_r * 0.9, hy - 0.2 * head_r), (hx + beak_dir * head_r * 1.6, hy + 0.05 * head_r), (hx + beak_dir * head_r * 0.9, hy + 0.3 * head_r)], fill=(230, 160, 40))
    # the class mark on the wing: centred on the body, about a third of its size
    mx0, mx1 = body[0] + 0.3 * bw, body[0] + 0.7 * bw
    my0, my1 = y0 + 0.25 * bh, y0 + 0.75 * bh
    if pattern == "Patched":
        draw.ellipse([mx0, my0, mx1, my1], fill=mark_color)
    elif pattern == "Striped":
        for k in range(3):
            sx = mx0 + (k + 0.25) * (mx1 - mx0) / 3
            draw.rectangle([sx, my0, sx + 0.12 * (mx1 - mx0), my1], fill=mark_color)
    else:
        r = 0.09 * (mx1 - mx0) + 1
        for fx, fy in ((0.2, 0.3), (0.5, 0.7), (0.8, 0.3)):
            cx, cy = mx0 + fx * (mx1 - mx0), my0 + fy * (my1 - my0)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=mark_color)
    x1 = min(body[0] - (0.25 * bw if facing_right else 0), hx - head_r * (1.6 if not facing_right else 1))
    x2 = max(body[2] + (0.25 * bw if not facing_right else 0), hx + head_r * (1.6 if facing_right else 1))
    y1, y2 = hy - head_r, y0 + bh
    return (float(max(x1, 0)), float(max(y1, 0)), float(min(x2, w)), float(min(y2, h)))


def generate_scenes(spec: SyntheticSpec) -> Iterator[Scene]:
    """Yield ``num_classes * images_per_class`` scenes, class by class, deterministically for ``spec``."""
    n_test = max(1, int(round(spec.test_fraction * spec.images_per_class)))
    for label in range(spec.num_classes):
        for k in range(spec.images_per_class):
            rng = np.random.default_rng([spec.seed, label, k])
            image, box = render_scene(rng, label, spec)
            yield Scene(image=image, label=label, box=box, is_train=k >= n_test)


def default_cache_dir() -> Path:
    """``$MGFF_CACHE_DIR`` or ``~/.cache/mgff``."""
    return Path(os.environ.get("MGFF_CACHE_DIR", Path.home() / ".cache" / "mgff")).expanduser()


def write_atomically(target: Path, write) -> Path:
    """Run ``write(tmp_dir)`` and rename ``tmp_dir`` to ``target``; reuse ``target`` if it already exists."""
    target = Path(target)
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    (tmp / ".complete").write_text("ok\n")
    try:
        if target.exists() and not (target / ".complete").is_file():
            shutil.rmtree(target)  # a half-written folder from an older, killed writer
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
        if not (target / ".complete").is_file():
            raise
    return target


def write_cub_layout(folder: Path, spec: SyntheticSpec) -> None:
    """Write the scenes of ``spec`` into ``folder`` in the exact ``CUB_200_2011`` layout."""
    names = class_names(spec.num_classes)
    folders = [f"{i + 1:03d}.{name}" for i, name in enumerate(names)]
    images, labels, split, boxes = [], [], [], []
    for image_id, scene in enumerate(generate_scenes(spec), start=1):
        rel = f"{folders[scene.label]}/{names[scene.label]}_{image_id:04d}.jpg"
        (folder / "images" / folders[scene.label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(folder / "images" / rel, quality=92)
        x1, y1, x2, y2 = scene.box
        images.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {scene.label + 1}")
        split.append(f"{image_id} {int(scene.is_train)}")
        boxes.append(f"{image_id} {x1:.1f} {y1:.1f} {x2 - x1:.1f} {y2 - y1:.1f}")
    (folder / "classes.txt").write_text("".join(f"{i + 1} {f}\n" for i, f in enumerate(folders)))
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("train_test_split.txt", split), ("bounding_boxes.txt", boxes)):
        (folder / name).write_text("\n".join(lines) + "\n")
    (folder / "synthetic_spec.json").write_text(json.dumps(asdict(spec), indent=2))


def write_synthetic_cub(root: str | Path | None = None, spec: SyntheticSpec | None = None) -> Path:
    """Write (once) a generated dataset in the ``CUB_200_2011`` layout and return its folder.

    Args:
        root: target folder; default ``<cache>/synthetic/cub-<hash of spec>/CUB_200_2011``.
        spec: what to generate (default :class:`SyntheticSpec`).
    """
    spec = spec or SyntheticSpec()
    if root is None:
        root = default_cache_dir() / "synthetic" / f"cub-{spec.key()}" / "CUB_200_2011"
    return write_atomically(Path(root), lambda tmp: write_cub_layout(tmp, spec))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a generated fine-grained dataset in the CUB_200_2011 layout.")
    parser.add_argument("root", nargs="?", default=None)
    parser.add_argument("--num-classes", type=int, default=8)
    parser.add_argument("--images-per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_synthetic_cub(args.root, SyntheticSpec(num_classes=args.num_classes, images_per_class=args.images_per_class, seed=args.seed)))
