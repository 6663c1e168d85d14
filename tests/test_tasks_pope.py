"""
    OMP_NUM_THREADS=1 python -m pytest -q tests/test_tasks_pope.py

tasks/pope.py: POPE's metrics by hand, answers read as POPE's evaluate.py reads them, and a file with a bad
label stopped with the file and line.
"""
import pytest

from conftest import write_lines
from tasks import common, pope


def test_pope_metrics_by_hand():
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no"]
    preds = ["yes", "yes", "no", "no", "yes", "no", "no", "no"]
    m = pope.pope_metrics(preds, labels)
    # TP=2 FP=1 TN=3 FN=2
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["yes_ratio"] == pytest.approx(3 / 8) and m["n"] == 8
    none = pope.pope_metrics(["no"] * 4, ["yes", "no", "yes", "no"])
    assert none["precision"] == 0 and none["recall"] == 0 and none["f1"] == 0 and none["accuracy"] == 0.5


def test_pope_reads_answers_as_pope_evaluate_py():
    """Expected verdicts read off AoiDragon/POPE evaluate.py (the same loop is LLaVA's llava/eval/eval_pope.py): keep
    the text before the first ".", drop ",", split on single spaces; "no" iff the words hold "No", "not" or "no";
    everything else is "yes"."""
    cases = {"There is a dog.": "yes", "No.": "no", "No": "no", "no, there is none": "no", "Not at all": "yes",
             "NO": "yes", "No!": "yes", "(no)": "yes", "Yes, there is no dog": "no", "I see a cat. No dog.": "yes",
             "": "yes", "not": "no", "nothing": "yes", "yes": "yes", "the red one is a square , so no": "no",
             "2.5 no": "yes"}  # "2.5 no": the text before the first "." is "2"
    assert {a: pope.pope_reading(a) for a in cases} == cases
    # four "yes" items answered "There is a dog.", four "no" items "No.": perfect by POPE's reading
    answers = ["There is a dog."] * 4 + ["No."] * 4
    labels = ["yes"] * 4 + ["no"] * 4
    m = pope.pope_metrics([pope.pope_reading(a) for a in answers], labels)
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (1.0, 1.0, 1.0, 1.0, 0.5)
    # our stricter reading, an extra column only: an answer that says neither yes nor no is invalid
    assert pope.invalid_rate(answers) == 0.5
    assert [common.parse_yes_no(a) for a in ["Yes, there is.", " NO.", "there is", "Not at all", "yesterday"]] == \
        ["yes", "no", None, "no", None]


def test_a_pope_item_without_a_yes_no_label_is_an_error_naming_file_and_line(tmp_path):
    rows = [dict(question_id=1, image="a.jpg", text="Is there a dog?", label="yes"),
            dict(question_id=2, image="a.jpg", text="Is there a cat?", lable="no")]
    write_lines(tmp_path / "coco_pope_random.json", rows)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'coco_pope_random.json'}: line 2 has no label"):
        pope.load([str(tmp_path / "coco_pope_random.json")], str(tmp_path))
    rows[1] = dict(rows[1], label="none")
    write_lines(tmp_path / "coco_pope_random.json", rows)
    with pytest.raises(ValueError, match=r"line 2 has label 'none'"):
        pope.load([str(tmp_path / "coco_pope_random.json")], str(tmp_path))
