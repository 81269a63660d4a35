"""The real-photo benchmarks on anyone's photos and weights (issue 20 §4): ``real_photos_two_stage.py``,
``two_stage_cost.py`` and ``source_view_cost.py`` (``box_quality.py``: ``tests/test_box_quality.py``).

- Each takes ``--root`` with the one default of :mod:`benchmarks.real_data`, and ``--weights``/``--mean``/``--std``
  where it builds a pretrained model (``source_view_cost.py`` reads no weights).
- A ``--root`` pointing nowhere exits naming the path.
- Each runs on the generated CUB of ``tests/conftest.py`` with a random EfficientNet-Lite0 state dict as
  ``--weights``, in seconds; ``real_photos_two_stage.py`` reads its checkpoint with ``weights_only=True`` and refuses
  one that does not fit, naming the file; ``--pool`` turns its saved evaluations (one per seed) into mean ± sd and
  pooled paired intervals, and refuses files it cannot pair.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import box_quality, real_data, real_photos, real_photos_two_stage, source_view_cost, two_stage_cost  # noqa: E402
from test_checkpoint_trust import save_checkpoint  # noqa: E402

torch.set_num_threads(1)
WITH_WEIGHTS = {"box_quality": box_quality, "real_photos_two_stage": real_photos_two_stage, "two_stage_cost": two_stage_cost}
SCRIPTS = {**WITH_WEIGHTS, "source_view_cost": source_view_cost}


def help_text(module, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_script_takes_root_with_the_one_default(name, capsys):
    text = help_text(SCRIPTS[name], capsys)
    assert "--root ROOT" in text
    assert "".join(str(real_data.DEFAULT_ROOT).split()) in "".join(text.split())  # argparse wraps long paths
    if name in WITH_WEIGHTS:
        assert "--weights WEIGHTS" in text and "--mean M M M" in text and "--std S S S" in text
        assert "".join(str(real_data.DEFAULT_WEIGHTS).split()) in "".join(text.split())
    else:  # no model with weights: an option that changed nothing would mislead
        assert "--weights" not in text


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_root_that_does_not_exist_is_named(name, tmp_path):
    nowhere = tmp_path / "nowhere"
    extra = ["--checkpoint", str(tmp_path / "none.ckpt")] if name == "real_photos_two_stage" else []
    with pytest.raises(SystemExit, match=rf"--root {nowhere}"):
        SCRIPTS[name].main(["--root", str(nowhere)] + extra)


def runner_checkpoint(path: Path, cub_root: Path, weights: Path, **overrides) -> Path:
    """The runner's ``ts_single`` model on these photos and weights, built from its config by the CLI (nothing
    trained), saved as a checkpoint."""
    source = real_data.RealData(root=cub_root, weights=weights, **overrides)
    return save_checkpoint(path, real_photos.build(real_photos.RUNS["ts_single"], source, cache=None)[0])


def test_real_photos_two_stage_on_other_photos_and_weights(cub_root, weights, tmp_path, capsys):
    (tmp_path / "ts_single").mkdir()
    checkpoint = runner_checkpoint(tmp_path / "ts_single" / "best.ckpt", cub_root, weights)
    out = tmp_path / "eval"
    real_photos_two_stage.main(["--root", str(cub_root), "--weights", str(weights), "--checkpoint", str(checkpoint),
                                "--limit", "4", "--workers", "0", "--out", str(out)])
    result = json.loads((out / "two_stage_eval_ts_single.json").read_text())
    assert result["root"] == str(cub_root) and result["images"] == 4
    assert list(result["rows"]) == list(real_photos_two_stage.VARIANTS)
    for name in ("ts_oracle_view", "ts_oracle_source"):  # the official box, scored against itself
        assert result["rows"][name]["box_miou"] == pytest.approx(1.0) and result["rows"][name]["box_hit50"] == 1.0
    printed = capsys.readouterr().out
    assert f"4 test photos of {cub_root}" in printed
    # the saved evaluation is what --pool reads: twice the same file, so no spread, and the one run's differences
    saved = str(out / "two_stage_eval_ts_single.pt")
    real_photos_two_stage.main(["--pool", saved, saved])
    text = capsys.readouterr().out
    assert "2 evaluations of the same 4 test photos" in text and "| ts_oracle_source |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ts_")]
    assert len(rows) == 4 and all(line.count("± 0.000") == 4 for line in rows)
    one = re.search(r"- ts_features_source - ts_features_view: stage 2 (\S+ \[\S+, \S+\]), merged (\S+ \[\S+, \S+\])", printed)
    assert f"- ts_features_source - ts_features_view: stage2 {one[1]}, merged {one[2]}" in text


class Pickled:  # an object only a full unpickler rebuilds (code, not tensors)
    pass


def test_real_photos_two_stage_refuses_checkpoints_that_do_not_fit(cub_root, weights, tmp_path):
    args = ["--root", str(cub_root), "--weights", str(weights), "--limit", "2", "--workers", "0", "--out", str(tmp_path / "eval")]
    # weights_only=True: a checkpoint that needs code to unpickle is refused
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "callback": Pickled()}, pickled)
    with pytest.raises(SystemExit, match=rf"--checkpoint {pickled}: not a checkpoint torch.load\(weights_only=True\) can read"):
        real_photos_two_stage.main(args + ["--checkpoint", str(pickled)])
    # trained on inputs normalised otherwise than --mean/--std say
    imagenet = runner_checkpoint(tmp_path / "imagenet.ckpt", cub_root, weights, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    with pytest.raises(SystemExit, match=rf"--checkpoint {imagenet} does not fit ts_features_view: .*input mean"):
        real_photos_two_stage.main(args + ["--checkpoint", str(imagenet)])


def test_two_stage_cost_on_other_photos_and_weights_with_a_cache_per_root(cub_root, weights, tmp_path, capsys):
    cache = tmp_path / "cache"
    two_stage_cost.main(["--root", str(cub_root), "--weights", str(weights), "--runs", "linear_best,ts_features_source", "--baseline", "linear_best",
                         "--repeats", "1", "--batch-size", "2", "--cache", str(cache)])
    text = capsys.readouterr().out
    assert f"batch 2 test photos of {cub_root}" in text
    assert "| linear_best | 0.768 | 1.00x |" in text  # EfficientNet-Lite0 at 224 px
    assert "| ts_features_source | 1.536 | 2.00x |" in text  # stage 1 + stage 2 at 224 px, the box read from stage 1's maps
    # linear_best reads the resized cache: written under --cache, in this root's own folder
    assert [p.name for p in cache.iterdir()] == [real_data.RealData(root=cub_root).cache_dir(cache).name]


def test_source_view_cost_on_other_photos(cub_root, capsys):
    source_view_cost.main(["--root", str(cub_root), "--images", "4", "--repeats", "1", "--batch", "2", "--resize", "72", "--crop", "64", "--source-size", "128"])
    text = capsys.readouterr().out
    assert f"4 CUB photos of {cub_root} (originals)" in text
    assert "| bytes to the device | 49,152 | 98,304 | 49,152 (+100%) |" in text  # float32 64 px view, uint8 128 px source


def saved_evaluation(path: Path, labels: torch.Tensor, right: dict[str, int], boxes_hit: int = 0) -> Path:
    """A ``two_stage_eval_*.pt`` as the script saves it: per variant, stage 1/2 logits right on the first
    ``right[variant]`` photos (stage 1 always wrong) and boxes that hit the official one on the first ``boxes_hit``."""
    n, classes = len(labels), 3
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]]).repeat(n, 1)
    parts = {}
    for name, k in right.items():
        stage2 = torch.nn.functional.one_hot((labels + 1) % classes, classes).float()
        stage2[:k] = torch.nn.functional.one_hot(labels[:k], classes).float() * 5
        box = torch.tensor([[60.0, 60.0, 90.0, 90.0]]).repeat(n, 1)
        box[:boxes_hit] = gt[:boxes_hit]
        parts[name] = {"stage1": torch.nn.functional.one_hot((labels + 2) % classes, classes).float(), "stage2": stage2, "box": box}
    torch.save({"labels": labels, "gt": gt, "parts": parts}, path)
    return path


def test_pool_gives_mean_sd_and_pooled_intervals_of_saved_evaluations(tmp_path):
    labels = torch.arange(10) % 3
    a = saved_evaluation(tmp_path / "a.pt", labels, {"ts_features_view": 3, "ts_features_source": 6}, boxes_hit=5)
    b = saved_evaluation(tmp_path / "b.pt", labels, {"ts_features_view": 4, "ts_features_source": 8}, boxes_hit=7)
    text = real_photos_two_stage.pool([a, b])
    # stage 2 of the source variant: 0.6 and 0.8; a merge with a confidently right stage 2 is right
    assert "| ts_features_source | 0.000 ± 0.000 (0.000 / 0.000) | 0.700 ± 0.141 (0.600 / 0.800) | 0.700 ± 0.141 (0.600 / 0.800) | 0.600 ± 0.141 (0.500 / 0.700) |" in text
    # ((0.6 - 0.3) + (0.8 - 0.4)) / 2 = 0.35; the view's right photos are a subset of the source's: never below 0
    line = next(l for l in text.splitlines() if l.startswith("- ts_features_source - ts_features_view"))
    d, low, high = (float(x) for x in re.search(r"stage2 (\S+) \[(\S+), (\S+)\]", line).groups())
    assert d == pytest.approx(0.35) and 0.0 <= low < 0.35 < high <= 0.7


def test_pool_refuses_files_it_cannot_pair(tmp_path):
    a = saved_evaluation(tmp_path / "a.pt", torch.arange(10) % 3, {"ts_features_view": 3})
    other = saved_evaluation(tmp_path / "other.pt", torch.arange(8) % 3, {"ts_features_view": 3})
    with pytest.raises(SystemExit, match=rf"--pool {other}: tested on other photos than {a}"):
        real_photos_two_stage.pool([a, other])
    with pytest.raises(SystemExit, match=rf"--pool {tmp_path / 'none.pt'}: no such file"):
        real_photos_two_stage.pool([a, tmp_path / "none.pt"])
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {}}, wrong)
    with pytest.raises(SystemExit, match=rf"--pool {wrong}: not an evaluation this script saved"):
        real_photos_two_stage.pool([a, wrong])
