"""
    OMP_NUM_THREADS=1 python -m pytest -q tests/test_shapes_tower.py

The shapes world's vision tower (shapes_tower.py): its labels on hand-made scenes (per cell; per patch, from
shapes.label_map), and a tower pretrained for a few seconds that names what it was taught to and loads back.
"""
import shapes
import shapes_tower


def test_cell_labels_hand_case():
    """Two objects on a 3x3 grid: 9 patches map one to one onto cells; 6x6 patches four to a cell."""
    objs = [dict(color="blue", shape="star", size="large", row=0, col=2),
            dict(color="red", shape="circle", size="small", row=2, col=1)]
    blue_star = (1 + 2, 1 + 5, 2)  # COLORS index 2, SHAPES index 5, SIZES index 1, each +1 (0 = empty)
    red_circle = (1 + 0, 1 + 0, 1)
    lab = shapes_tower.cell_labels(objs, patches=3, grid=3)
    assert lab == [(0, 0, 0, 0, 0), (0, 0, 0, 0, 1), blue_star + (0, 2),
                   (0, 0, 0, 1, 0), (0, 0, 0, 1, 1), (0, 0, 0, 1, 2),
                   (0, 0, 0, 2, 0), red_circle + (2, 1), (0, 0, 0, 2, 2)]
    fine = shapes_tower.cell_labels(objs, patches=6, grid=3)
    assert [k for k, x in enumerate(fine) if x[0]] == [4, 5, 10, 11, 26, 27, 32, 33]


def test_pretrained_tower_learns_the_cells(tmp_path):
    """The world's vision tower, pretrained for a few seconds, names each cell's colour on unseen images far above
    the majority class (empty), and saves a tower + image processor that load back."""
    from model import VLM
    out = str(tmp_path / "w")
    shapes.generate(out, n_train=300, n_test=20, image_size=24, progress=False)
    tiny = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2)
    acc = shapes_tower.pretrain_tower(out, str(tmp_path / "tower"), vision=tiny, steps=300, batch_size=32, progress=False)
    empty = 1 - 3 / 9  # 2-4 objects in 9 cells: about 2/3 of the cells are empty
    assert min(acc["color"], acc["row"], acc["col"]) > 0.9, acc
    assert acc["shape"] > empty + 0.15, acc
    tower = VLM.load_vision_tower(str(tmp_path / "tower"))
    assert (tower.config.image_size, tower.config.patch_size) == (24, 8)


def test_patch_labels_hand_case():
    """A red square 8 px wide straddling two patches, and a grey speck: each patch knows only its own blocks, and
    the shape of the object covering most of it."""
    red, grey, square = 1 + list(shapes.COLORS).index("red"), shapes.CLUTTER_ID, 1 + shapes.SHAPES.index("square")
    sq = dict(color="red", shape="square", size="large", row=3, col=1, x=16.0, y=36.0, r=4 / 0.82)  # [12,20)x[32,40)
    speck = dict(x=43.0, y=5.0, r=1.5)  # covers the 2 px block [42,44)x[4,6) whole, slivers of its neighbours
    lab = shapes_tower.patch_labels([sq], 48, 8, [speck])
    assert len(lab) == 36 and all(len(x) == shapes.SUB * shapes.SUB + 3 for x in lab)
    assert lab[4 * 6 + 1] == (0, 0, red, red) * 4 + (square, 4, 1)  # right half of patch (4, 1)
    assert lab[4 * 6 + 2] == (red, red, 0, 0) * 4 + (square, 4, 2)  # left half of patch (4, 2)
    others = [x for k, x in enumerate(lab) if k not in (4 * 6 + 1, 4 * 6 + 2, 0 * 6 + 5)]
    assert all(set(x[:17]) == {0} for x in others)  # empty, and no shape
    assert lab[5] == tuple(grey if k == 2 * 4 + 1 else 0 for k in range(16)) + (0, 0, 5)  # block row 2, col 1
    assert [r * 6 + c for *_, r, c in lab] == list(range(36))
    assert shapes_tower.patch_labels([sq], 48, 8, shape=False)[25] == (0, 0, red, red) * 4 + (4, 1)  # "blocks" labels


def test_patch_shape_is_the_majority_objects():
    """Patch (1, 1) holds a 3x3-block red square and a few blocks of a blue cross: it names the square."""
    red, blue = 1 + list(shapes.COLORS).index("red"), 1 + list(shapes.COLORS).index("blue")
    sq = dict(color="red", shape="square", size="small", row=0, col=0, x=11.0, y=11.0, r=3 / 0.82)  # [8,14)^2
    cross = dict(color="blue", shape="cross", size="large", row=0, col=1, x=19.5, y=12.0, r=5.0)
    lab = shapes_tower.patch_labels([sq, cross], 48, 8)[1 * 6 + 1]
    blocks = lab[:16]
    assert [k for k, v in enumerate(blocks) if v == red] == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert 0 < blocks.count(blue) < 9 and set(blocks) == {0, red, blue}
    assert lab[16:] == (1 + shapes.SHAPES.index("square"), 1, 1)
