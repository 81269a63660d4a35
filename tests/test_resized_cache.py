"""The resized image cache: sizes and paths, boxes scaled back, resuming, settings, bad images, CLI."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_modules.cub import CUB200DataModule, read_cub
from data_modules.dataset import FineGrainedDataset
from data_modules.errors import BadImageError, MissingImagesError
from data_modules.resized_cache import CacheMismatchError, ResizedImageCache, main, resized_size
from datamodule_helpers import tiny_datamodule

SIDE = 80  # the generated CUB images have sides 96-128: all are resized


def _paths(root: Path) -> list[str]:
    splits = read_cub(root)
    return [s.path for s in splits.train + splits.test]


def _dm(root, cache_dir, **kw):
    return tiny_datamodule(CUB200DataModule, root, cache_dir=cache_dir, **{"cache_size": SIDE, **kw})


@pytest.fixture(scope="module")
def prepared(cub_root, tmp_path_factory) -> Path:
    """``cub_root`` cached at ``SIDE`` px by the serial path."""
    cache_dir = tmp_path_factory.mktemp("cache") / "cub-80"
    ResizedImageCache(cache_dir, SIDE).prepare(cub_root, _paths(cub_root), workers=0, progress=False)
    return cache_dir


def test_resized_size_keeps_aspect_and_never_enlarges():
    assert resized_size(1200, 900, 512) == (683, 512)
    assert resized_size(375, 500, 512) == (375, 500)
    assert resized_size(900, 1200, 512) == (512, 683)
    assert resized_size(512, 2000, 512) == (512, 2000)


def test_same_paths_shorter_side_and_recorded_sizes(cub_root, prepared):
    manifest = ResizedImageCache(prepared, SIDE).read_manifest()
    assert sorted(manifest) == sorted(_paths(cub_root))
    for path, (source_w, source_h, cached_w, cached_h, orientation) in manifest.items():
        with Image.open(cub_root / path) as source, Image.open(prepared / path) as cached:
            assert source.size == (source_w, source_h) and cached.size == (cached_w, cached_h)
            assert cached.format == "JPEG" and min(cached.size) == SIDE
            assert abs(cached_w / cached_h - source_w / source_h) < 0.02
    info = json.loads((prepared / "cache.json").read_text())
    assert info["shorter_side"] == SIDE and info["jpeg_quality"] == 95 and info["source_root"] == str(cub_root.resolve())


def test_small_images_are_copied_byte_for_byte(cub_root, tmp_path):
    manifest = ResizedImageCache(tmp_path / "c", 110).prepare(cub_root, _paths(cub_root), progress=False)
    copied = [p for p, (w, h, cw, ch, orientation) in manifest.items() if min(w, h) <= 110]
    resized = [p for p in manifest if p not in copied]
    assert copied and resized
    assert all((cub_root / p).read_bytes() == (tmp_path / "c" / p).read_bytes() for p in copied)
    assert all(min(manifest[p][2:4]) == 110 for p in resized)


def test_parallel_preparation_matches_serial(cub_root, prepared, tmp_path):
    parallel = ResizedImageCache(tmp_path / "p", SIDE).prepare(cub_root, _paths(cub_root), workers=2, progress=False)
    assert parallel == ResizedImageCache(prepared, SIDE).read_manifest()
    some = _paths(cub_root)[7]
    assert (tmp_path / "p" / some).read_bytes() == (prepared / some).read_bytes()


def test_datamodule_reads_the_cache_and_boxes_match_the_originals(cub_root, prepared):
    cached, original = _dm(cub_root, prepared), _dm(cub_root, None)
    cached.prepare_data()  # nothing left to do
    cached.setup("test")
    original.setup("test")
    assert cached.datasets["test"].root == prepared and original.datasets["test"].root == cub_root
    # the splits keep original pixels; only the datasets' samples are scaled
    assert [s.box for s in cached.splits.test] == [s.box for s in original.splits.test]
    for i in range(6):
        # both pipelines resize to 72x72: the transformed boxes are the same up to float error
        assert torch.allclose(cached.datasets["test"][i]["box"], original.datasets["test"][i]["box"], atol=1e-3)


def test_crop_to_box_from_the_cache_crops_the_same_region(cub_root, prepared):
    cached, original = _dm(cub_root, prepared, crop_to_box=True), _dm(cub_root, None, crop_to_box=True)
    cached.setup("test")
    original.setup("test")
    unscaled = FineGrainedDataset(prepared, original.splits.test, cached.datasets["test"].transform, crop_to_box=True)
    for i in range(4):
        want = original.datasets["test"][i]["image"]
        right = (cached.datasets["test"][i]["image"] - want).abs().mean()
        wrong = (unscaled[i]["image"] - want).abs().mean()  # the original-pixel box on the smaller image
        assert right < 0.5 * wrong


def test_setup_without_preparation_says_how(cub_root, tmp_path):
    dm = _dm(cub_root, tmp_path / "empty")
    with pytest.raises(MissingImagesError, match=r"48 of .* not in the resized cache .*prepare_data\(\).*python -m data_modules.resized_cache"):
        dm.setup("fit")


def test_interrupted_preparation_resumes_without_redoing_or_using_partial_files(cub_root, tmp_path, monkeypatch):
    cache = ResizedImageCache(tmp_path / "c", SIDE)
    paths = _paths(cub_root)
    real_save = Image.Image.save
    calls = {"n": 0}

    def save_then_die_on_the_fifth(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            Path(fp).write_bytes(b"\xff\xd8 half a jpeg")  # the kill comes mid-write
            raise RuntimeError("killed")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_die_on_the_fifth)
    with pytest.raises(RuntimeError, match="killed"):
        cache.prepare(cub_root, paths, progress=False)
    monkeypatch.undo()
    # the four finished images are recorded; the fifth is not under its final name
    assert sorted(cache.read_manifest()) == sorted(paths[:4])
    assert not (cache.cache_dir / paths[4]).exists()
    assert not list(cache.cache_dir.rglob("*.part"))
    done = {p: (cache.cache_dir / p).stat().st_mtime_ns for p in paths[:4]}

    # a process killed hard leaves its temporary file behind, and may die before writing the manifest
    stale = (cache.cache_dir / paths[4]).with_name(f".{Path(paths[4]).name}.99999.part")
    stale.write_bytes(b"\xff\xd8 half")
    os.utime(stale, (1_000_000, 1_000_000))
    cache.manifest_path.unlink()

    manifest = cache.prepare(cub_root, paths, progress=False)
    assert sorted(manifest) == sorted(paths)
    assert {p: (cache.cache_dir / p).stat().st_mtime_ns for p in paths[:4]} == done  # not written again
    with Image.open(cache.cache_dir / paths[4]) as img:
        img.load()
        assert min(img.size) == SIDE
    assert not stale.exists()


def test_cache_of_other_settings_or_source_is_refused(cub_root, cub_copy, prepared):
    dm = _dm(cub_root, prepared, cache_size=96)
    with pytest.raises(CacheMismatchError, match=r"shorter_side=80, this run asks for 96"):
        dm.setup("fit")
    with pytest.raises(CacheMismatchError, match=r"holds images of .* not of .*"):
        ResizedImageCache(prepared, SIDE).prepare(cub_copy, _paths(cub_copy), progress=False)


def test_moved_dataset_is_read_with_a_warning(cub_copy, prepared, caplog):
    logger = logging.getLogger("mgff")
    logger.addHandler(caplog.handler)  # the CLI tests may have stopped "mgff" from propagating
    try:
        dm = _dm(cub_copy, prepared)
        dm.setup("test")
    finally:
        logger.removeHandler(caplog.handler)
    assert "was prepared from" in caplog.text and len(dm.datasets["test"]) == 24


def test_missing_source_images_are_listed(cub_copy, tmp_path):
    victim = _paths(cub_copy)[3]
    (cub_copy / victim).unlink()
    with pytest.raises(MissingImagesError, match=r"1 of 48 images to cache are missing") as err:
        ResizedImageCache(tmp_path / "c", SIDE).prepare(cub_copy, _paths(cub_copy), progress=False)
    assert victim in str(err.value)


def test_bad_image_stops_preparation_or_is_copied_for_skipping(cub_copy, tmp_path):
    victim = read_cub(cub_copy).test[0].path
    (cub_copy / victim).write_bytes(b"this is not a jpeg")
    with pytest.raises(BadImageError, match=Path(victim).name):
        _dm(cub_copy, tmp_path / "c").prepare_data()
    dm = _dm(cub_copy, tmp_path / "c", on_bad_image="skip")
    dm.prepare_data()
    assert ResizedImageCache(tmp_path / "c", SIDE).read_manifest()[victim] is None
    assert (tmp_path / "c" / victim).read_bytes() == b"this is not a jpeg"
    dm.setup("test")
    assert next(iter(dm.test_dataloader()))["image"].shape[0] == 3  # the bad one skipped


def test_bad_cache_size_is_refused(cub_root, tmp_path):
    with pytest.raises(ValueError, match="cache_size"):
        _dm(cub_root, tmp_path, cache_size=0)


def test_command_line_prepares_a_cache_the_datamodule_uses(cub_root, tmp_path, capsys):
    # in-process (a subprocess would spend most of the test importing torch and lightning again)
    cache_dir = main(
        ["--dataset", "cub", "--root", str(cub_root), "--cache-dir", str(tmp_path / "cli"), "--shorter-side", str(SIDE), "--workers", "2"]
    )
    assert f"48 images of cub ({cub_root}) cached at {SIDE}px in {cache_dir}" in capsys.readouterr().out
    dm = _dm(cub_root, cache_dir)
    dm.setup("fit")
    assert dm.datasets["train"].root == cache_dir


def test_command_line_names_a_wrong_dataset(capsys):
    with pytest.raises(SystemExit):
        main(["--dataset", "imagenet", "--root", "r", "--cache-dir", "c"])
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err


def test_stale_temporary_files_are_removed_on_every_run_but_fresh_ones_are_kept(cub_root, tmp_path):
    """A complete cache, a killed run's leftover (2 h old) and a live writer's file (just written)."""
    cache = ResizedImageCache(tmp_path / "c", SIDE)
    paths = _paths(cub_root)
    cache.prepare(cub_root, paths, progress=False)
    folder = (cache.cache_dir / paths[0]).parent
    stale, live = folder / ".a.jpg.4242.part", folder / ".b.jpg.4343.part"
    stale.write_bytes(b"\xff\xd8 half")
    live.write_bytes(b"\xff\xd8 being written")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(stale, (two_hours_ago, two_hours_ago))
    cache.prepare(cub_root, paths, progress=False)  # nothing left to do
    assert not stale.exists() and live.exists()


def test_cache_of_an_older_format_is_refused_with_what_to_do(cub_root, tmp_path):
    """Format 1 ignored EXIF orientation and clipped 16-bit images: its files would disagree with the originals."""
    cache = ResizedImageCache(tmp_path / "old", SIDE)
    cache.prepare(cub_root, _paths(cub_root)[:2], progress=False)
    info = json.loads(cache.info_path.read_text())
    cache.info_path.write_text(json.dumps({**info, "format": 1}))
    with pytest.raises(CacheMismatchError, match=r"format 1, this version reads format 2 .*delete .*old"):
        cache.prepare(cub_root, _paths(cub_root), progress=False)
