"""
    OMP_NUM_THREADS=1 python -m pytest -q tests/test_tasks_reefknot.py

tasks/reefknot.py: Reefknot's readings by hand, and its official layout read and scored.
"""
import os

import pytest

from conftest import CannedRunner, write_reefknot_layout
from tasks import reefknot


def test_reefknot_scoring_by_hand():
    """Expected verdicts read off JackChen-seu/Reefknot RLC-bench/neok_code/utils.py: calculate_yes_no_accuracy says
    "yes" iff 'yes' is a substring of the stripped, lower-cased response; calculate_multichoice_accuracy compares the
    response's first character, upper-cased, with the upper-cased label. Reefknot has no VQA scorer: that rule is
    ours (the label's words, in order and next to each other, among the answer's)."""
    ok = reefknot.reefknot_correct
    assert [ok("yesno", a, "yes") for a in ["Yes", "yes, it is", "YES.", "yesterday", "no", "I think so", ""]] == \
        [True, True, True, True, False, False, False]
    assert [ok("yesno", a, "no") for a in ["No", "not really", "", "yes", "No, the man's eyes are closed"]] == \
        [True, True, True, False, False]  # "eyes" holds "yes"
    assert [ok("multichoice", a, "C") for a in ["C", "c", "(c)", "C. behind", " c", "B", "", "cat"]] == \
        [True, True, False, True, False, False, False, True]
    assert not ok("multichoice", "(B) onto", "B") and ok("multichoice", "b) onto", "B")
    assert [ok("vqa", a, "left of") for a in ["left of", "It is left of it.", "Left Of", "left", "of left",
                                             "right of"]] == [True, True, True, False, False, False]
    assert ok("vqa", "eating", "eating") and not ok("vqa", "beating", "eating")
    shut = reefknot.reefknot_metrics([True], ["yesno"], ["perception"], ["No, the eyes are shut"])
    assert shut["yesno"]["yes_ratio"] == 1
    # 4 YESNO items (2 perception, 2 cognition), 2 multichoice, 1 vqa
    tasks = ["yesno"] * 4 + ["multichoice"] * 2 + ["vqa"]
    types = ["perception", "perception", "cognition", "cognition", "perception", "cognition", "perception"]
    correct = [True, False, True, True, True, False, False]
    answers = ["yes", "yes", "no", "yes", "a", "b", "x"]
    m = reefknot.reefknot_metrics(correct, tasks, types, answers)
    assert m["yesno"]["n"] == 4 and m["yesno"]["accuracy"] == 0.75 and m["yesno"]["hallucination_rate"] == 0.25
    assert m["yesno"]["by_relation_type"]["perception"]["accuracy"] == 0.5
    assert m["yesno"]["by_relation_type"]["cognition"]["hallucination_rate"] == 0.0
    assert m["yesno"]["yes_ratio"] == 0.75
    assert m["multichoice"]["accuracy"] == 0.5 and m["vqa"]["hallucination_rate"] == 1.0
    assert m["mean"]["accuracy"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert m["mean"]["hallucination_rate"] == pytest.approx(1 - (0.75 + 0.5 + 0.0) / 3)
    assert m["mean"]["tasks"] == ["yesno", "multichoice", "vqa"]


def test_reefknot_reads_thewrite_reefknot_layout_and_scores_it(tmp_path):
    root, images = str(tmp_path / "reefknot"), str(tmp_path / "vg")
    write_reefknot_layout(root, images)
    with pytest.warns(UserWarning, match="999.jpg"):
        items, skipped = reefknot.load(root, images)
    assert skipped == 1 and [it["task"] for it in items] == ["yesno", "yesno", "multichoice", "vqa", "vqa"]
    assert items[0]["image"] == os.path.join(images, "2344270.jpg") and items[2]["relation_type"] == "unspecified"
    r = CannedRunner({it["query"]: a for it, a in zip(items, ["Yes, it is.", "Yes", "A", "riding", "behind it"])})
    rep = reefknot.run(r, items)
    assert [q for q, _, _ in r.asked] == [it["query"] for it in items]  # the prompts go in as they are
    assert rep["yesno"]["accuracy"] == 0.5 and rep["yesno"]["by_relation_type"]["perception"]["accuracy"] == 0.0
    assert rep["multichoice"]["accuracy"] == 1.0 and rep["vqa"]["accuracy"] == 0.5
    assert rep["vqa"]["by_relation_type"] == {"cognition": dict(n=1, accuracy=1.0, hallucination_rate=0.0),
                                             "perception": dict(n=1, accuracy=0.0, hallucination_rate=1.0)}
    assert rep["mean"]["hallucination_rate"] == pytest.approx(1 - (0.5 + 1.0 + 0.5) / 3)
    with pytest.raises(FileNotFoundError, match="YESNO.jsonl"):
        reefknot.load(str(tmp_path), images)
