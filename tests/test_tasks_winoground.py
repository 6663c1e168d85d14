"""
    OMP_NUM_THREADS=1 python -m pytest -q tests/test_tasks_winoground.py

tasks/winoground.py: the text / image / group scores of a 2x2 table.
"""
import torch

from tasks import winoground


def test_winoground_scores():
    # S[i][j] = score(caption i, image j)
    assert winoground.winoground_scores([[2, 1], [0, 3]]) == dict(text=1.0, image=1.0, group=1.0)
    # each image prefers its own caption (2 > 1.5, 3 > 2.5) but caption 0 prefers image 1 (2.5 > 2)
    assert winoground.winoground_scores([[2, 2.5], [1.5, 3]]) == dict(text=1.0, image=0.0, group=0.0)
    # caption 1 wins on image 0 (3 > 2): text fails; each caption prefers its own image: image holds
    assert winoground.winoground_scores([[2, 1], [3, 4]]) == dict(text=0.0, image=1.0, group=0.0)
    assert winoground.winoground_scores(torch.tensor([[1.0, 1.0], [1.0, 1.0]])) == dict(text=0.0, image=0.0, group=0.0)
