"""UnlabeledFolderDataModule: any folder layout, undecodable files reported, input pixels mapped back to the photo's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.errors import DatasetNotFoundError
from data_modules.unlabeled_folder import UnlabeledFolderDataModule, UnlabeledImages, find_images


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_images_found_in_any_layout(tmp_path):
    gray = np.full((20, 30, 3), 128, dtype=np.uint8)
    save(tmp_path / "photos" / "2024" / "site A" / "x.JPG", gray)
    save(tmp_path / "photos" / "y.png", gray)
    save(tmp_path / "photos" / ".thumbnails" / "z.jpg", gray)  # hidden folder: skipped
    (tmp_path / "photos" / "readme.txt").write_text("not an image")
    save(tmp_path / "elsewhere" / "linked.jpg", gray)
    (tmp_path / "photos" / "link.jpg").symlink_to(tmp_path / "elsewhere" / "linked.jpg")
    found = [p.as_posix() for p in find_images(tmp_path / "photos")]
    assert found == ["2024/site A/x.JPG", "link.jpg", "y.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"no image files .* under .*empty"):
        find_images(tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError, match="is not a folder"):
        find_images(tmp_path / "missing")


@pytest.mark.parametrize("source_size", [None, 96])
def test_input_pixels_map_back_to_the_photo(tmp_path, source_size):
    """A bright rectangle found in the model's input, mapped with ``input_to_photo``, lands where it is in the photo."""
    width, height, rect = 200, 120, (60, 30, 140, 90)  # x1, y1, x2, y2 in the photo
    photo = np.zeros((height, width, 3), dtype=np.uint8)
    photo[rect[1]:rect[3], rect[0]:rect[2]] = 255
    save(tmp_path / "p.png", photo)
    dataset = UnlabeledImages(tmp_path, find_images(tmp_path), resize_size=80, crop_size=64, mean=(0, 0, 0), std=(1, 1, 1), source_size=source_size)
    item = dataset[0]
    assert item["error"] == "" and item["image"].shape == (3, 64, 64)
    ys, xs = torch.nonzero(item["image"][0] > 0.5, as_tuple=True)
    box_in_input = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    s = item["input_to_photo"]
    mapped = box_in_input * s[[0, 1, 0, 1]] + s[[2, 3, 2, 3]]
    # one input pixel is 200/80 x 120/80 photo pixels (resize 80, crop 64 of it)
    torch.testing.assert_close(mapped[0], torch.tensor(rect, dtype=torch.float32), atol=2 * width / 80, rtol=0)


def test_undecodable_file_gives_an_error_item(tmp_path):
    save(tmp_path / "good.jpg", np.zeros((10, 10, 3), dtype=np.uint8))
    (tmp_path / "bad.jpg").write_bytes(b"\x00not a jpeg")
    dm = UnlabeledFolderDataModule(tmp_path, resize_size=40, crop_size=32, batch_size=2, num_workers=0)
    batch = next(iter(dm.predict_dataloader()))
    assert batch["path"] == ["bad.jpg", "good.jpg"] and batch["image"].shape == (2, 3, 32, 32)
    assert "bad.jpg" in batch["error"][0] and batch["error"][1] == ""
