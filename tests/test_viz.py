"""mgff.viz: every figure is checked by what it draws (axes, titles, image data, pixels where a box
lies) and every table against values computed by hand."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.patches import Rectangle
from PIL import Image

from data_modules.base import FineGrainedDataModule, Splits
from data_modules.cub import CUB200DataModule
from data_modules.samples import Sample
from data_modules.transforms import IMAGENET_MEAN, IMAGENET_STD, apply_transform, build_eval_transform
from mgff.viz.dataset import augmentation_grid, class_counts, image_grid, image_sizes, plot_class_counts, plot_image_sizes, sample_batch, sample_grid
from mgff.viz.drawing import to_display
from mgff.viz.errors import confusion_matrix, most_confused_pairs, per_class_accuracy, plot_confused_examples, plot_confusion_matrix, plot_per_class_accuracy, prediction_class_names, read_predictions
from mgff.viz.fusion import attention_received, fusion_maps, plot_fusion_maps, super_node_labels
from mgff.viz.localization import crop_panel, localization_panel, response_overlay
from mgff.viz.stages import plot_stage_predictions, stage_logits, stage_predictions
from mgff.lit import FineGrainedClassifier, TwoStageClassifier

torch.set_num_threads(1)

TINY = dict(backbone="resnet10t", img_size=64, stages=[2, 3, 4], fusion_dim=32, num_heads=2, num_super_nodes=3)
TINY_CROPPER = dict(localization="rollout", cropper="vit_tiny_patch16_224", cropper_kwargs={"depth": 2}, localize_size=64, crop_size=64)
GREEN, RED, BLACK = (0, 255, 0), (255, 0, 0), (0, 0, 0)


# ----- helpers ----------------------------------------------------------------------------------
def render(fig) -> np.ndarray:
    """The figure as an ``(H, W, 3)`` uint8 array, drawn by Agg."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def colours_near(fig, pixels: np.ndarray, ax, x: float, y: float, radius: int = 1) -> set[tuple[int, int, int]]:
    """Colours of the rendered pixels within ``radius`` of data point ``(x, y)`` of ``ax``."""
    px, py = ax.transData.transform((x, y))
    row, col = int(round(pixels.shape[0] - py)), int(round(px))
    patch = pixels[row - radius : row + radius + 1, col - radius : col + radius + 1].reshape(-1, 3)
    return {tuple(int(v) for v in p) for p in patch}


def rectangles(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def rect_xyxy(rect: Rectangle) -> tuple[float, float, float, float]:
    x, y = rect.get_xy()
    return (x, y, x + rect.get_width(), y + rect.get_height())


def black_batch(n: int, size: int) -> torch.Tensor:
    """Images that are black after ImageNet denormalisation."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((torch.zeros(n, 3, size, size) - mean) / std)


class ListedDataModule(FineGrainedDataModule):
    """A DataModule over hand-made samples, to check statistics against known numbers."""

    def __init__(self, root, splits: Splits, **kwargs):
        super().__init__(root=root, num_workers=0, **kwargs)
        self._given = splits

    def read_splits(self, root):
        return self._given


@pytest.fixture
def known_images(tmp_path):
    """Three solid-colour images of known sizes and a DataModule listing them (val given, empty)."""
    sizes = {"a/0.png": (30, 20), "b/1.png": (40, 50), "b/2.png": (60, 10)}
    for i, (rel, (w, h)) in enumerate(sizes.items()):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (40 * i, 100, 200)).save(tmp_path / rel)
    splits = Splits(
        train=[Sample("a/0.png", 0, (1.0, 1.0, 10.0, 10.0)), Sample("b/1.png", 1, None)],
        test=[Sample("b/2.png", 1, (0.0, 0.0, 60.0, 10.0))],
        val=[],
        class_names=["alpha", "beta"],
    )
    return tmp_path, sizes, ListedDataModule(tmp_path, splits, resize_size=64, crop_size=64)


@pytest.fixture
def cub_dm(cub_root):
    return CUB200DataModule(cub_root, resize_size=72, crop_size=64, batch_size=4, num_workers=0)


@pytest.fixture(scope="module")
def two_stage():
    torch.manual_seed(0)
    return TwoStageClassifier(num_classes=4, class_names=["c0", "c1", "c2", "c3"], **TINY, **TINY_CROPPER)


# ----- 1. data ----------------------------------------------------------------------------------
def test_to_display_undoes_the_normalisation():
    image = torch.rand(2, 3, 5, 7)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    normalised = (image - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    shown = to_display(normalised, mean, std)
    assert len(shown) == 2 and shown[0].shape == (5, 7, 3)
    np.testing.assert_allclose(shown[1], image[1].permute(1, 2, 0).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        to_display(torch.zeros(2, 1, 4, 4))


def test_image_grid_draws_each_box_where_it_is():
    images = [np.zeros((40, 40, 3), np.uint8), np.zeros((30, 50, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)]
    boxes = [(5.0, 5.0, 30.0, 20.0), (float("nan"),) * 4, None]
    fig = image_grid(images, boxes, titles=["first", "second", "third"], ncols=2)
    assert len(fig.axes) == 3  # the fourth grid cell is removed
    assert [ax.get_title() for ax in fig.axes] == ["first", "second", "third"]
    assert [len(rectangles(ax)) for ax in fig.axes] == [1, 0, 0]
    assert rect_xyxy(rectangles(fig.axes[0])[0]) == (5.0, 5.0, 30.0, 20.0)
    assert fig.axes[1].images[0].get_array().shape == (30, 50, 3)
    pixels = render(fig)
    ax = fig.axes[0]
    assert GREEN in colours_near(fig, pixels, ax, 17.5, 5.0)  # the top edge of the box
    assert GREEN in colours_near(fig, pixels, ax, 30.0, 12.5)  # its right edge
    assert colours_near(fig, pixels, ax, 17.5, 12.5, radius=2) == {BLACK}  # inside: the image
    with pytest.raises(ValueError, match="2 boxes for 3 images"):
        image_grid(images, boxes[:2])


def test_class_counts_and_image_sizes_match_the_listed_files(known_images):
    _, sizes, dm = known_images
    counts = class_counts(dm)
    assert counts["name"].tolist() == ["alpha", "beta"]
    assert counts[["train", "val", "test", "total"]].to_numpy().tolist() == [[1, 0, 0, 1], [1, 0, 1, 2]]
    table = image_sizes(dm)
    assert table["split"].tolist() == ["train", "train", "test"]
    assert list(zip(table["width"], table["height"])) == list(sizes.values())
    assert table["label"].tolist() == [0, 1, 1]


def test_class_counts_of_the_generated_cub(cub_dm):
    counts = class_counts(cub_dm)
    # 4 classes x 12 images: half test; of the 6 train images per class, round(0.1 * 6) = 1 is held out
    assert len(counts) == 4
    assert (counts["train"] == 5).all() and (counts["val"] == 1).all() and (counts["test"] == 6).all()
    assert counts["total"].sum() == 48


def test_plot_class_counts_and_image_sizes_draw_the_tables(known_images):
    _, sizes, dm = known_images
    counts = class_counts(dm)
    fig = plot_class_counts(counts)
    ax = fig.axes[0]
    widths = [p.get_width() for p in ax.patches]  # train bars, then val bars, then test bars
    assert widths == [1, 1, 0, 0, 0, 1]
    assert [p.get_x() for p in ax.patches[4:]] == [1, 1]  # test stacked after train + val
    assert "3 in 2 classes" in ax.get_title()

    fig = plot_image_sizes(image_sizes(dm))
    ax = fig.axes[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert sorted(map(tuple, points.tolist())) == sorted(map(tuple, map(list, sizes.values())))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train (2)", "test (1)"]


def test_sample_grid_shows_stored_images_with_their_boxes(cub_dm):
    fig = sample_grid(cub_dm, "train", num_images=6, ncols=3)
    assert len(fig.axes) == 6
    samples = {s.path: s for s in cub_dm.split_samples("train")}
    for ax in fig.axes:
        name, size = ax.get_title().split("\n")
        assert name in cub_dm.class_names
        w, h = (int(v) for v in size.split(" x "))
        assert ax.images[0].get_array().shape == (h, w, 3)
        assert len(rectangles(ax)) == 1  # every generated image has a box
    labels = [cub_dm.class_names.index(ax.get_title().split("\n")[0]) for ax in fig.axes]
    assert labels == sorted(labels)
    assert len(samples) == 20


def test_augmentation_grid_without_randomness_is_the_eval_resize(known_images):
    root, _, dm = known_images
    dm.hflip = 0.0  # resize 64 -> crop 64, no flip: the train pipeline equals the eval one
    fig = augmentation_grid(dm, index=0, num_views=3)
    assert [ax.get_title() for ax in fig.axes] == ["original 30 x 20", "view 1", "view 2", "view 3"]
    image = np.asarray(Image.open(root / "a/0.png").convert("RGB"))
    expected, box = apply_transform(build_eval_transform(64, 64), image, (1.0, 1.0, 10.0, 10.0))
    expected = to_display(expected)[0]
    for ax in fig.axes[1:]:
        np.testing.assert_allclose(ax.images[0].get_array(), expected, atol=1e-6)
        np.testing.assert_allclose(rect_xyxy(rectangles(ax)[0]), box, atol=1e-4)
    np.testing.assert_allclose(box, (64 / 30, 64 / 20, 640 / 30, 640 / 20), rtol=1e-5)


def test_augmentation_grid_is_random_but_seeded(cub_dm):
    def views(seed):
        fig = augmentation_grid(cub_dm, index=2, num_views=3, seed=seed)
        return [np.asarray(ax.images[0].get_array()) for ax in fig.axes[1:]]

    first, again, other = views(0), views(0), views(1)
    assert all(v.shape == (64, 64, 3) for v in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], first[1])  # different random crops / flips
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_sample_batch_is_a_seeded_transformed_batch(cub_dm):
    batch = sample_batch(cub_dm, "test", num_images=5, seed=3)
    assert batch["image"].shape == (5, 3, 64, 64) and batch["box"].shape == (5, 4)
    assert batch["index"].tolist() == sorted(batch["index"].tolist())
    assert torch.equal(sample_batch(cub_dm, "test", num_images=5, seed=3)["index"], batch["index"])


# ----- 2. the cropper ---------------------------------------------------------------------------
def test_response_overlay_draws_map_predicted_and_ground_truth_boxes():
    images = black_batch(2, 32)
    response = torch.zeros(2, 32, 32)
    response[1, 8:16, 8:16] = 1.0
    boxes = torch.tensor([[4.0, 4.0, 20.0, 28.0], [8.0, 8.0, 16.0, 16.0]])
    gt = torch.tensor([[2.0, 10.0, 30.0, 30.0], [float("nan")] * 4])
    fig = response_overlay(images, response, boxes, gt, titles=["a", "b"], alpha=0.5)
    assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == ["a", "b"]
    np.testing.assert_array_equal(fig.axes[1].images[1].get_array(), response[1].numpy())
    assert [len(rectangles(ax)) for ax in fig.axes] == [2, 1]  # no ground truth on the second
    pixels = render(fig)
    ax = fig.axes[0]
    assert RED in colours_near(fig, pixels, ax, 12.0, 4.0)  # top edge of the predicted box
    assert GREEN in colours_near(fig, pixels, ax, 30.0, 20.0)  # right edge of the ground truth
    # inside both boxes, the black image under jet(0) = dark blue at alpha 0.5
    inside = colours_near(fig, pixels, ax, 12.0, 20.0, radius=0).pop()
    assert inside[0] == 0 and inside[1] == 0 and 55 <= inside[2] <= 75
    with pytest.raises(ValueError, match="responses must be"):
        response_overlay(images, response[:, :16], boxes)


def test_crop_panel_puts_images_over_their_crops():
    images = torch.rand(2, 3, 32, 32)
    crops = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 30.0], [4.0, 4.0, 12.0, 12.0]])
    fig = crop_panel(images, crops, boxes, titles=["x", "y"], mean=None, std=None)
    assert len(fig.axes) == 4
    top, bottom = fig.axes[:2], fig.axes[2:]
    assert [ax.get_title() for ax in top] == ["x", "y"]
    assert bottom[0].get_title() == "crop of 20 x 30 px -> 16 px"
    np.testing.assert_allclose(bottom[1].images[0].get_array(), crops[1].permute(1, 2, 0).numpy(), atol=1e-6)
    assert rect_xyxy(rectangles(top[1])[0]) == (4.0, 4.0, 12.0, 12.0)
    assert all(not rectangles(ax) for ax in bottom)



def test_localization_panel_puts_map_and_boxes_over_the_crop_at_its_real_resolution():
    images = torch.rand(2, 3, 32, 32)
    response = torch.zeros(2, 32, 32)
    response[0, :8, :8] = 1.0
    crops = torch.rand(2, 3, 12, 12)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 12.0, 12.0]])
    gt = torch.tensor([[1.0, 1.0, 9.0, 9.0], [float("nan")] * 4])
    fig = localization_panel(images, response, boxes, crops, gt, titles=["a", "b"], crop_titles=["c0", "c1"], mean=None, std=None)
    top, bottom = fig.axes[:2], fig.axes[2:]
    assert [ax.get_title() for ax in fig.axes] == ["a", "b", "c0", "c1"]
    np.testing.assert_array_equal(top[0].images[1].get_array(), response[0].numpy())
    assert [len(rectangles(ax)) for ax in top] == [2, 1] and all(not rectangles(ax) for ax in bottom)
    assert rect_xyxy(rectangles(top[0])[0]) == (1.0, 1.0, 9.0, 9.0)  # the ground truth, then the prediction
    # the crop pixel for pixel: its own 12 x 12 array, nearest-neighbour
    np.testing.assert_allclose(bottom[1].images[0].get_array(), crops[1].permute(1, 2, 0).numpy(), atol=1e-6)
    assert bottom[1].images[0].get_interpolation() == "nearest"
    assert localization_panel(images, response, boxes, crops, mean=None, std=None).axes[2].get_title() == "crop 12 x 12 px"
    with pytest.raises(ValueError, match="crops"):
        localization_panel(images, response, boxes, crops[:1], mean=None, std=None)


# ----- 3. the two stages ------------------------------------------------------------------------
def test_stage_predictions_against_hand_computed_softmax():
    logits = {
        "main": torch.tensor([[0.0, 0.0, 5.0], [0.0, 1.0, 0.0]]),
        "stage2": torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 1.0]]),
        "stage1": torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]),
    }
    table = stage_predictions(logits, torch.tensor([0, 1]), ["cat", "dog", "fox"])
    assert list(table.columns) == [
        "label", "label_name",
        "stage1_pred", "stage1_name", "stage1_prob", "stage1_correct",
        "stage2_pred", "stage2_name", "stage2_prob", "stage2_correct",
        "merged_pred", "merged_name", "merged_prob", "merged_correct",
    ]  # fmt: skip
    assert table["label_name"].tolist() == ["cat", "dog"]
    assert table["stage1_pred"].tolist() == [0, 2] and table["stage1_correct"].tolist() == [True, False]
    assert table["stage2_pred"].tolist() == [0, 1] and table["stage2_name"].tolist() == ["cat", "dog"]
    assert table["merged_correct"].tolist() == [False, True]
    e = math.e
    np.testing.assert_allclose(table["stage1_prob"], [e**2 / (e**2 + 2), e**3 / (e**3 + 2)], rtol=1e-6)
    np.testing.assert_allclose(table["stage2_prob"], [1 / 3, e**3 / (e**3 + e + 1)], rtol=1e-6)


def test_stage_logits_of_a_two_stage_model_keep_its_mode(two_stage):
    images = torch.randn(3, 3, 64, 64)
    two_stage.train()
    logits = stage_logits(two_stage, images)
    assert two_stage.training
    assert set(logits) == {"main", "stage1", "stage2"} and logits["main"].shape == (3, 4)
    merged = (logits["stage1"].softmax(-1) + logits["stage2"].softmax(-1)) / 2
    torch.testing.assert_close(logits["main"].exp(), merged, atol=1e-5, rtol=1e-5)


def test_plot_stage_predictions_titles_and_accuracy_bars():
    logits = {
        "stage1": torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]]),
        "stage2": torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0]]),
        "main": torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]]),
    }
    table = stage_predictions(logits, torch.tensor([0, 1, 1]), ["a", "b"])
    fig = plot_stage_predictions(torch.zeros(3, 3, 8, 8), table, ncols=2)
    assert len(fig.axes) == 4  # 3 images + the bar chart
    first = fig.axes[0].get_title().split("\n")
    assert first[0] == "true: a" and first[1].startswith("✓ stage1: a") and first[3].startswith("✓ merged: a")
    assert fig.axes[1].get_title().split("\n")[1].startswith("✗ stage1: a")
    assert fig.axes[1].title.get_color() == "red" and fig.axes[0].title.get_color() == "black"
    bars = fig.axes[3]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["stage1", "stage2", "merged"]
    np.testing.assert_allclose([p.get_height() for p in bars.patches], [2 / 3, 1.0, 1 / 3])
    assert bars.get_title() == "accuracy on these 3 images"


# ----- 4. the fusion head -----------------------------------------------------------------------
def test_attention_received_averages_heads_and_queries():
    attention = torch.zeros(1, 2, 4, 4)
    attention[0, 0, :, 0] = 1.0  # head 0: every query looks at key 0
    attention[0, 1] = 0.25  # head 1: uniform
    received = attention_received(attention, (2, 2))
    torch.testing.assert_close(received, torch.tensor([[[0.625, 0.125], [0.125, 0.125]]]))
    with pytest.raises(ValueError, match="N = 3 \\* 2"):
        attention_received(attention, (3, 2))


def test_super_node_labels_follow_scale_row_column_order():
    assignment = torch.zeros(1, 8, 3)
    strongest = [0, 1, 2, 2, 1, 1, 0, 2]
    assignment[0, torch.arange(8), torch.tensor(strongest)] = 1.0
    labels = super_node_labels(assignment, (2, 2))
    assert labels.shape == (1, 2, 2, 2)
    assert labels[0, 0].tolist() == [[0, 1], [2, 2]] and labels[0, 1].tolist() == [[1, 1], [0, 2]]
    with pytest.raises(ValueError, match="whole number"):
        super_node_labels(torch.zeros(1, 6, 3), (2, 2))


def test_fusion_maps_of_the_mgff_head_and_their_figure(two_stage):
    images = torch.randn(2, 3, 64, 64)
    maps = fusion_maps(two_stage, images)
    assert maps.grid == (2, 2) and maps.num_super_nodes == 3
    assert len(maps.attention) == 3  # stages 2, 3, 4, each with its MHSA map
    for received in maps.attention:
        assert received.shape == (2, 2, 2)
        torch.testing.assert_close(received.sum(dim=(1, 2)), torch.ones(2))
    assert maps.super_nodes.shape == (2, 1, 2, 2) and maps.super_nodes.max() < 3
    torch.testing.assert_close(maps.super_nodes[:, 0].flatten(1), maps.assignment.argmax(-1))

    fig = plot_fusion_maps(images, maps, scale_names=["s2", "s3", "s4"])
    assert len(fig.axes) == 2 * 5
    assert [ax.get_title() for ax in fig.axes[:5]] == ["image", "attention s2", "attention s3", "attention s4", "super-nodes"]
    np.testing.assert_allclose(fig.axes[5 + 2].images[1].get_array(), maps.attention[1][1].numpy())
    np.testing.assert_array_equal(fig.axes[4].images[1].get_array(), maps.super_nodes[0, 0].numpy())


def test_fusion_maps_of_stage_two_use_its_own_classifier_when_it_has_one(two_stage):
    images = torch.randn(2, 3, 64, 64)
    shared_1, shared_2 = fusion_maps(two_stage, images, stage=1), fusion_maps(two_stage, images, stage=2)
    torch.testing.assert_close(shared_2.assignment, shared_1.assignment)  # one network for both stages
    torch.manual_seed(0)
    separate = TwoStageClassifier(num_classes=4, shared_classifier=False, **TINY, **TINY_CROPPER)
    first, second = fusion_maps(separate, images, stage=1), fusion_maps(separate, images, stage=2)
    assert not torch.allclose(first.assignment, second.assignment)
    separate.head2.forward_details = None  # stage 2 must go through head2, stage 1 must not
    fusion_maps(separate, images, stage=1)
    with pytest.raises(TypeError, match="forward_details"):
        fusion_maps(separate, images, stage=2)
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        fusion_maps(separate, images, stage=3)
    own_head = TwoStageClassifier(num_classes=4, shared_head=False, **TINY, **TINY_CROPPER).eval()  # one backbone, two heads
    torch.testing.assert_close(fusion_maps(own_head, images, stage=2).assignment,
                               own_head.head2.forward_details(own_head.backbone(images))["assignment"].cpu())


def test_fusion_maps_without_global_attention_per_scale_nodes():
    model = FineGrainedClassifier(num_classes=3, attention="hilo", graph_nodes="per_scale", **TINY)
    images = torch.randn(1, 3, 64, 64)
    maps = fusion_maps(model, images)
    assert maps.attention == [None, None, None]
    assert maps.super_nodes.shape == (1, 3, 2, 2)
    fig = plot_fusion_maps(images, maps)
    assert [ax.get_title() for ax in fig.axes] == ["image", "super-nodes scale 1", "super-nodes scale 2", "super-nodes scale 3"]


def test_fusion_maps_needs_the_mgff_head():
    model = FineGrainedClassifier(num_classes=3, head="linear", **TINY)
    with pytest.raises(TypeError, match="LinearHead"):
        fusion_maps(model, torch.randn(1, 3, 64, 64))


# ----- 5. errors from predictions.csv -----------------------------------------------------------
NAMES = ["Crimson", "NA", "Golden"]  # "NA" must stay a name, not become a missing value
# (label, pred, prob): true 0 -> [1, 2, 0]; true 1 -> [0, 1, 1]; true 2 -> [1, 0, 1]
ROWS = [(0, 0, 0.9), (0, 1, 0.6), (0, 1, 0.8), (1, 1, 0.7), (1, 2, 0.5), (2, 2, 0.9), (2, 0, 0.4)]
MATRIX = [[1, 2, 0], [0, 1, 1], [1, 0, 1]]


@pytest.fixture
def predictions_csv(tmp_path):
    """A predictions.csv as PredictionCSVWriter writes it, with one solid-colour image per row."""
    records = []
    for i, (label, pred, prob) in enumerate(ROWS):
        path = f"images/{i}.png"
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.new("RGB", (12, 10), (30 * i, 0, 0)).save(tmp_path / path)
        records.append({"index": i, "path": path, "label": label, "label_name": NAMES[label], "pred": pred, "pred_name": NAMES[pred], "prob": prob})
    csv = tmp_path / "predictions.csv"
    pd.DataFrame(records).to_csv(csv, index=False)
    return csv


def test_confusion_matrix_from_csv(predictions_csv):
    table = read_predictions(predictions_csv)
    assert table["label_name"].tolist()[3] == "NA"
    assert confusion_matrix(predictions_csv).tolist() == MATRIX
    assert confusion_matrix(table, num_classes=4).tolist() == [row + [0] for row in MATRIX] + [[0, 0, 0, 0]]
    torch.testing.assert_close(confusion_matrix(table, normalize="true")[0], torch.tensor([1 / 3, 2 / 3, 0.0]))
    assert prediction_class_names(table) == NAMES
    assert prediction_class_names(table, num_classes=4) == NAMES + ["3"]


def test_read_predictions_refuses_other_csvs(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a predictions CSV"):
        read_predictions(tmp_path / "x.csv")


def test_plot_confusion_matrix_colours_row_shares_and_annotates_counts():
    fig = plot_confusion_matrix(torch.tensor(MATRIX), NAMES)
    ax = fig.axes[0]
    shares = np.asarray(MATRIX, float) / np.asarray(MATRIX).sum(1, keepdims=True)
    np.testing.assert_allclose(ax.images[0].get_array(), shares)
    assert sorted(t.get_text() for t in ax.texts) == ["1", "1", "1", "1", "1", "2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    assert "7 images, accuracy 0.429" in ax.get_title()


def test_per_class_accuracy_from_the_matrix():
    table = per_class_accuracy(torch.tensor([row + [0] for row in MATRIX] + [[0, 0, 0, 0]]), NAMES + ["empty"])
    assert table["support"].tolist() == [3, 2, 2, 0] and table["correct"].tolist() == [1, 1, 1, 0]
    np.testing.assert_allclose(table["accuracy"].to_numpy()[:3], [1 / 3, 1 / 2, 1 / 2])
    assert math.isnan(table["accuracy"].iloc[3])
    fig = plot_per_class_accuracy(table)
    ax = fig.axes[0]
    np.testing.assert_allclose([p.get_width() for p in ax.patches], [1 / 3, 1 / 2, 1 / 2])  # worst first, empty left out
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Crimson (3)", "NA (2)", "Golden (2)"]
    assert ax.get_title() == f"per-class accuracy, mean {(1 / 3 + 1) / 3:.3f}"


def test_most_confused_pairs_sorted_by_count_then_index():
    pairs = most_confused_pairs(torch.tensor(MATRIX), NAMES, top_k=5)
    assert list(zip(pairs["true"], pairs["pred"], pairs["count"])) == [(0, 1, 2), (1, 2, 1), (2, 0, 1)]
    assert pairs["true_name"].tolist() == ["Crimson", "NA", "Golden"]
    np.testing.assert_allclose(pairs["share"], [2 / 3, 1 / 2, 1 / 2])
    assert len(most_confused_pairs(torch.tensor(MATRIX), top_k=1)) == 1
    assert len(most_confused_pairs(torch.eye(3, dtype=torch.long))) == 0


def test_plot_confused_examples_shows_the_mistakes_and_a_real_example(predictions_csv):
    table = read_predictions(predictions_csv)
    pairs = most_confused_pairs(confusion_matrix(table), prediction_class_names(table), top_k=2)
    fig = plot_confused_examples(table, pairs, predictions_csv.parent, examples_per_pair=3)
    axes = np.asarray(fig.axes).reshape(2, 4)
    # pair Crimson -> NA: rows 2 (p=0.8) then 1 (p=0.6); third slot empty; then the real NA (row 3)
    assert axes[0, 0].get_title() == "Crimson\n-> NA p=0.80" and axes[0, 1].get_title() == "Crimson\n-> NA p=0.60"
    assert not axes[0, 2].images and axes[0, 3].get_title() == "a real\nNA"
    np.testing.assert_array_equal(axes[0, 0].images[0].get_array()[0, 0], [60, 0, 0])  # image 2's colour
    np.testing.assert_array_equal(axes[0, 3].images[0].get_array()[0, 0], [90, 0, 0])  # image 3's colour
    assert axes[1, 0].get_title() == "NA\n-> Golden p=0.50" and axes[1, 3].get_title() == "a real\nGolden"
    with pytest.raises(ValueError, match="no confused pairs"):
        plot_confused_examples(table, pairs.iloc[:0], predictions_csv.parent)
