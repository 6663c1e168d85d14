"""
    OMP_NUM_THREADS=1 python -m pytest -q tests/test_tasks_common.py

tasks/common.py: image folders searched in order, image ids without an extension found.
"""
import os

import pytest
from PIL import Image

from conftest import write_lines, write_reefknot_layout
from tasks import common, reefknot, winoground


def test_image_folders_are_searched_in_order_and_ids_without_extension_found(tmp_path):
    """Reefknot's images come as Visual Genome's two folders (VG_100K, VG_100K_2), searched in order as Reefknot's own
    loader does; Winoground's download names its images without an extension ("ex_0_img_0")."""
    root, vg = str(tmp_path / "reefknot"), tmp_path / "vg"
    write_reefknot_layout(root, str(vg / "VG_100K"))
    os.replace(vg / "VG_100K" / "4680.jpg", tmp_path / "4680.jpg")
    os.makedirs(vg / "VG_100K_2")
    os.replace(tmp_path / "4680.jpg", vg / "VG_100K_2" / "4680.jpg")
    with pytest.warns(UserWarning, match="999.jpg"):
        items, skipped = reefknot.load(root, [str(vg / "VG_100K"), str(vg / "VG_100K_2")])
    assert skipped == 1 and len(items) == 5
    assert [os.path.relpath(it["image"], vg) for it in items] == \
        ["VG_100K/2344270.jpg"] * 2 + ["VG_100K_2/4680.jpg"] * 3
    # one folder only: a file whose images are all in the other one stops, saying several folders can be given
    with pytest.warns(UserWarning, match="999.jpg"), pytest.raises(FileNotFoundError, match=(
            r"^reefknot/Multichoice.jsonl: none of the 1 items' images exist .*several: comma-separated")):
        reefknot.load(root, [str(vg / "VG_100K")])
    assert common.image_folders(f" {vg}/VG_100K , {vg}/VG_100K_2", "d") == [f"{vg}/VG_100K", f"{vg}/VG_100K_2"]
    images = tmp_path / "wino"
    os.makedirs(images)
    for i in (0, 1):
        Image.new("RGB", (8, 8), (0, 90 * i, 0)).save(images / f"ex_0_img_{i}.png")
    write_lines(tmp_path / "winoground.jsonl", [dict(image_0="ex_0_img_0", image_1="ex_0_img_1",
                                                      caption_0="a dog on a cat", caption_1="a cat on a dog")])
    items, skipped = winoground.load(str(tmp_path / "winoground.jsonl"), str(images))
    assert skipped == 0 and items[0]["images"] == [str(images / "ex_0_img_0.png"), str(images / "ex_0_img_1.png")]
