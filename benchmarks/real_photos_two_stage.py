"""Two-stage on real photos, evaluated with one fine-tuned classifier (issue 13 §3, §4).

Takes the single-stage run of ``benchmarks/real_photos.py`` (``ts_single``: EfficientNet-Lite0 + linear
head fine-tuned at 224 px, inputs at ``--mean``/``--std``, 0.5 by default) and runs the two-stage model with
*those weights* on the test photos of ``--root`` (default: the 652 of the shared real photos,
:mod:`benchmarks.real_data`; stage 2 = the same classifier on the crop, as ``shared_classifier: true``),
for every combination of

- the localiser: ``features`` (the stage-1 network's own map) or ``ground_truth`` (the official box,
  the oracle), and
- the crop's source: stage 1's 224 px view or the same view at 448 px (``batch["source"]``, §3),

and reports per combination the test top-1 of stage 1, stage 2 and the merge (``mean_prob`` and
``sum_logits``), the boxes' mIoU / hit@0.5 against the official boxes (view frame), and stage 2's top-1
split by whether the box hits (IoU >= 0.5). Stage 2 was never trained on crops here: this isolates the
box and the crop's resolution from stage 2's training, which the two-stage runs of the runner add.
Intervals: :func:`mgff.stats.paired_bootstrap`. The checkpoint is untrusted input, read with ``weights_only=True``.
The models and the data are the runner's ``ts_*`` runs, built from their configs by the project's CLI
(:func:`benchmarks.real_photos.build`) on ``--weights`` (which the checkpoint's weights then replace) and the data's
normalisation ``--mean``/``--std``; a checkpoint trained with another backbone normalisation is refused, naming the file.

    nice -n 5 python benchmarks/real_photos_two_stage.py --checkpoint runs/real_photos_two_stage/ts_single/best.ckpt
    python benchmarks/real_photos_two_stage.py --root /data/CUB_200_2011 --weights my_lite0.safetensors \\
        --checkpoint runs/mine/ts_single/best.ckpt --out runs/mine/two_stage_eval
    python benchmarks/real_photos_two_stage.py --pool runs/seed{0,1,2}_eval/two_stage_eval_ts_features_source.pt

``--pool`` evaluates nothing: it reads the ``.pt`` files earlier runs saved (one per seed, same test photos) and
prints every variant's mean ± sd over them and the pooled paired intervals (:func:`mgff.stats.pooled_paired_bootstrap`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import box_iou

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import real_data, real_photos  # noqa: E402
from benchmarks.measure import describe_machine, machine_info  # noqa: E402
from benchmarks.real_data import RealData  # noqa: E402
from mgff.stats import paired_bootstrap, pooled_paired_bootstrap  # noqa: E402

VARIANTS = ("ts_features_view", "ts_features_source", "ts_oracle_view", "ts_oracle_source")
KNOWN_VARIANTS = VARIANTS + ("ts_energy_source",)  # the features box with the `energy` response (the default before `refined`)
DEFAULT_OUT = real_photos.DEFAULT_OUT.parent / "real_photos_two_stage"


def load_models(checkpoint: Path, variants=VARIANTS, source: RealData = RealData()) -> dict[str, torch.nn.Module]:
    """Each variant's two-stage model (the runner's run, built on ``source``'s weights and normalisation) with the
    checkpoint's weights (a single-stage run's, or a two-stage run's with a shared classifier: the same keys). The
    checkpoint is read as untrusted input (:func:`benchmarks.real_data.read_checkpoint`); one that does not fit
    exits naming the file."""
    state = real_data.read_checkpoint(checkpoint)["state_dict"]
    models = {}
    for name in variants:
        model = real_photos.build(real_photos.RUNS[name], source, cache=None)[0].eval()
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except (RuntimeError, ValueError) as err:  # a shape that differs; another backbone normalisation
            raise SystemExit(f"--checkpoint {checkpoint} does not fit {name}: {err}") from None
        missing = [k for k in missing if not k.startswith(("metrics.", "box_iou."))]
        if missing or unexpected:
            raise SystemExit(f"--checkpoint {checkpoint} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        models[name] = model
    return models


def padded(boxes: torch.Tensor, padding: float, side: float) -> torch.Tensor:
    """``(B, 4)`` xyxy boxes grown by ``padding`` x their width / height on every side, clipped to ``[0, side]``."""
    size = torch.cat([boxes[:, 2:] - boxes[:, :2]] * 2, dim=1)
    return (boxes + padding * size * torch.tensor([-1.0, -1.0, 1.0, 1.0])).clamp(0, side)


def evaluate(models: dict[str, torch.nn.Module], loader, oracle_padding: float = 0.0) -> dict[str, dict[str, torch.Tensor]]:
    """Per variant: stage-1 and stage-2 logits ``(N, C)``, boxes ``(N, 4)``; plus labels and ground-truth boxes.
    ``oracle_padding`` grows the boxes the oracle variants are given (the scores stay against the official box)."""
    out = {name: {"stage1": [], "stage2": [], "box": []} for name in models}
    labels, gt = [], []
    with torch.inference_mode():
        for batch in loader:
            labels.append(batch["label"])
            gt.append(batch["box"])
            oracle_batch = {**batch, "box": padded(batch["box"], oracle_padding, batch["image"].shape[-1])} if oracle_padding else batch
            for name, model in models.items():
                given = oracle_batch if "oracle" in name else batch
                logits, _, extras = model.forward_outputs(given["image"], given)
                out[name]["stage1"].append(logits["stage1"].float())
                out[name]["stage2"].append(logits["stage2"].float())
                out[name]["box"].append(extras["box"].float())
    result = {name: {k: torch.cat(v) for k, v in parts.items()} for name, parts in out.items()}
    return result, torch.cat(labels), torch.cat(gt)


def merged_logits(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ``mean_prob`` merge (the model's default): log of the mean of the two stages' probabilities."""
    return ((parts["stage1"].softmax(-1) + parts["stage2"].softmax(-1)) / 2).log()


def interval(correct_a: torch.Tensor, correct_b: torch.Tensor) -> str:
    """``acc(b) - acc(a)`` with its paired bootstrap 95 % interval, as text."""
    d, low, high = paired_bootstrap(correct_a.numpy(), correct_b.numpy())
    return f"{d:+.3f} [{low:+.3f}, {high:+.3f}]"


def summarise(parts: dict[str, torch.Tensor], labels: torch.Tensor, gt: torch.Tensor, side: int = 224) -> dict[str, float]:
    """One variant's figures from its logits ``(N, C)`` and boxes ``(N, 4)`` against ``labels (N,)`` and the official
    boxes ``gt (N, 4)``, all in the frame of the ``side`` x ``side`` view; ``box_area`` is a share of the view."""
    acc = lambda logits: float((logits.argmax(-1) == labels).float().mean())  # noqa: E731
    p1, p2 = parts["stage1"].softmax(-1), parts["stage2"].softmax(-1)
    iou = box_iou(parts["box"], gt).diagonal()
    hit = iou >= 0.5
    stage2_right = parts["stage2"].argmax(-1) == labels
    return dict(
        stage1=acc(parts["stage1"]),
        stage2=acc(parts["stage2"]),
        mean_prob=acc((p1 + p2) / 2),
        sum_logits=acc(parts["stage1"] + parts["stage2"]),
        box_miou=float(iou.mean()),
        box_hit50=float(hit.float().mean()),
        stage2_on_hits=float(stage2_right[hit].float().mean()) if hit.any() else float("nan"),
        stage2_on_misses=float(stage2_right[~hit].float().mean()) if (~hit).any() else float("nan"),
        box_area=float(((parts["box"][:, 2] - parts["box"][:, 0]) * (parts["box"][:, 3] - parts["box"][:, 1])).mean() / side**2),
    )


PAIRS = (("ts_features_view", "ts_features_source"), ("ts_oracle_view", "ts_oracle_source"))


def correct(parts: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image ``(N,)`` bool: stage 1, stage 2 and the ``mean_prob`` merge right."""
    return {"stage1": parts["stage1"].argmax(-1) == labels, "stage2": parts["stage2"].argmax(-1) == labels,
            "merged": merged_logits(parts).argmax(-1) == labels}


def pool(paths: list[Path]) -> str:
    """Markdown: per variant (those every file has) mean ± sd over the saved evaluations ``paths`` (one per seed) of
    stage 1, stage 2, the merge and hit@0.5; then the source - view differences pooled over the files (paired
    bootstrap over the test images). Files that were not tested on the same photos are refused, naming them."""
    runs = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"--pool {path}: no such file (the two_stage_eval_<run>.pt this script saves in --out)")
        try:
            runs.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # noqa: BLE001  (any unreadable file is named)
            raise SystemExit(f"--pool {path}: not an evaluation this script saved ({type(err).__name__}: {err})") from None
        if not {"labels", "gt", "parts"} <= set(runs[-1]):
            raise SystemExit(f"--pool {path}: not an evaluation this script saved (keys {sorted(runs[-1])}, expected labels, gt, parts)")
    for path, run in zip(paths[1:], runs[1:]):
        if not torch.equal(run["labels"], runs[0]["labels"]):
            raise SystemExit(f"--pool {path}: tested on other photos than {paths[0]} ({len(run['labels'])} vs {len(runs[0]['labels'])} labels, or another order)")
    variants = [v for v in runs[0]["parts"] if all(v in run["parts"] for run in runs)]
    labels, gt = runs[0]["labels"], runs[0]["gt"]
    rows = [{v: summarise(run["parts"][v], labels, gt) for v in variants} for run in runs]
    right = [{v: correct(run["parts"][v], labels) for v in variants} for run in runs]
    lines = [f"{len(runs)} evaluations of the same {len(labels)} test photos: {', '.join(str(p) for p in paths)}", "",
             "| variant | stage 1 | stage 2 | merged (mean prob) | hit@0.5 |", "|---|---|---|---|---|"]
    for v in variants:
        cells = []
        for key in ("stage1", "stage2", "mean_prob", "box_hit50"):
            values = [r[v][key] for r in rows]
            cells.append(f"{real_photos.mean_sd(values)} ({' / '.join(f'{x:.3f}' for x in values)})")
        lines.append(f"| {v} | {' | '.join(cells)} |")
    lines += ["", "Pooled paired differences (bootstrap 95 % over the test photos, averaged over the evaluations):"]
    for a, b in PAIRS:
        if a in variants and b in variants:
            text = []
            for k in ("stage2", "merged"):
                d, low, high = pooled_paired_bootstrap([(r[a][k].numpy(), r[b][k].numpy()) for r in right])
                text.append(f"{k} {d:+.3f} [{low:+.3f}, {high:+.3f}]")
            lines.append(f"- {b} - {a}: {', '.join(text)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_OUT / "ts_single" / "best.ckpt")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {','.join(KNOWN_VARIANTS)}")
    parser.add_argument("--oracle-padding", type=float, default=0.0, help="grow the oracle's boxes by this share of their size per side")
    parser.add_argument("--limit", type=int, default=None, help="first N test images only (a quick check)")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes")
    parser.add_argument("--pool", type=Path, nargs="+", default=None, metavar="EVAL_PT",
                        help="evaluate nothing: pool saved two_stage_eval_<run>.pt files (one per seed) into mean ± sd and pooled paired intervals")
    real_data.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.pool:
        print(pool(args.pool))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in KNOWN_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {KNOWN_VARIANTS}")
    source = real_data.from_args(args).check()
    if not args.checkpoint.is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file (a single-stage run's best.ckpt of benchmarks/real_photos.py)")
    torch.set_num_threads(args.threads)
    # every variant reads the same data: the originals with the 448 px source view (the runner's ts_* runs)
    data = real_photos.build_datamodule(real_photos.RUNS[variants[0]], source, cache=None, extra=real_photos.data_options(num_workers=args.workers))
    data.setup("test")
    if args.limit:
        data.datasets["test"].samples = data.datasets["test"].samples[: args.limit]
    models = load_models(args.checkpoint, variants, source)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    parts, labels, gt = evaluate(models, data.test_dataloader(), args.oracle_padding)
    minutes = (time.perf_counter() - start) / 60
    rows = {name: summarise(p, labels, gt, data.crop_size) for name, p in parts.items()}
    tag = args.checkpoint.parent.name + (f"_oraclepad{args.oracle_padding:g}" if args.oracle_padding else "")
    (args.out / f"two_stage_eval_{tag}.json").write_text(json.dumps(dict(checkpoint=str(args.checkpoint), root=str(source.root), images=len(labels), rows=rows), indent=1))
    print(describe_machine(machine_info(torch.device("cpu"))))
    print(f"Command: python benchmarks/real_photos_two_stage.py {' '.join(argv if argv is not None else sys.argv[1:])}".strip())
    print(f"{len(labels)} test photos of {source.root}, weights of {args.checkpoint}, {minutes:.1f} min\n")
    print("| variant | stage 1 | stage 2 | merged (mean prob) | merged (sum logits) | box mIoU | hit@0.5 | stage 2 on hits / misses | box area |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['stage1']:.3f} | {r['stage2']:.3f} | {r['mean_prob']:.3f} | {r['sum_logits']:.3f} | {r['box_miou']:.3f} | "
              f"{r['box_hit50']:.3f} | {r['stage2_on_hits']:.3f} / {r['stage2_on_misses']:.3f} | {r['box_area']:.2f} |")
    right = {name: correct(p, labels) for name, p in parts.items()}
    print("\nPaired differences on the same test photos (bootstrap 95 % interval):")
    for name in right:
        print(f"- {name}: merged - stage 1 {interval(right[name]['stage1'], right[name]['merged'])}")
    for a, b in PAIRS:
        if a in right and b in right:
            print(f"- {b} - {a}: stage 2 {interval(right[a]['stage2'], right[b]['stage2'])}, merged {interval(right[a]['merged'], right[b]['merged'])}")
    for a, b in (("ts_features_source", "ts_oracle_source"), ("ts_features_view", "ts_oracle_view"), ("ts_energy_source", "ts_features_source")):
        if a in right and b in right:
            print(f"- {b} - {a}: merged {interval(right[a]['merged'], right[b]['merged'])}")
    torch.save({"labels": labels, "gt": gt, "parts": parts}, args.out / f"two_stage_eval_{tag}.pt")


if __name__ == "__main__":
    main()
