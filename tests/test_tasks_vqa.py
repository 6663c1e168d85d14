"""
    OMP_NUM_THREADS=1 python -m pytest -q tests/test_tasks_vqa.py

tasks/vqa.py: VQAv2's normalisation and soft accuracy by hand, and the verdict as an extra figure beside them.
"""
import pytest

from conftest import CannedRunner
from tasks import vqa


def test_vqa_normalisation_and_soft_accuracy():
    """Expected values read off VQAv2's evaluation, GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py:
    processPunctuation (the listed marks dropped next to a space or in a text with a digit,digit comma, else a space;
    a "." not before a digit dropped), then processDigitArticle (lower case, number words incl. none -> digits,
    articles dropped, contractions restored); accuracy = mean over the 10 leave-one-out subsets of min(1, matches/3)."""
    norm = vqa.normalize_answer
    assert norm("Two.") == "2" == norm("2") and norm("None") == "0"
    assert norm("The Red  Circle!") == "red circle" and norm("an apple, please") == "apple please"
    assert norm("1.5") == "1.5" and norm("1,000") == "1000" and norm("u.s.a") == "usa"
    assert norm("red-white") == "red white" and norm("red - white") == "red white"
    assert norm("dont") == "don't" and norm("it's") == "it's" and norm("yes\n") == "yes"
    assert vqa.vqa_score("two", "2") == 1.0 and vqa.vqa_score("a square", "square") == 1.0  # one answer: exact match
    assert vqa.vqa_score("circle", "square") == 0.0
    ten = lambda k, a="2": [a] * k + ["x%d" % i for i in range(10 - k)]
    # k of 10 annotators agree: (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
    assert vqa.vqa_score("Two", ten(3)) == pytest.approx(0.9)
    assert vqa.vqa_score("two", ten(1)) == pytest.approx(0.3)
    assert vqa.vqa_score("2", ten(2)) == pytest.approx(0.6)
    assert vqa.vqa_score("2", ten(4)) == 1.0 and vqa.vqa_score("5", ten(4)) == 0.0
    assert vqa.vqa_score("none", ten(3, "0")) == pytest.approx(0.9)


def test_vqa_headline_is_vqav2s_reading_and_the_verdict_an_extra_figure():
    """VQAv2's evaluation scores a yes/no question like any other (normalised answer vs the annotators'); the shapes
    files' yes/no kinds (answer_type "yes/no") also get our verdict reading, as an extra figure only."""
    items = [dict(question="q1", answers=["yes"] * 10, image="x.png", type="yes/no", yes_no=True),
             dict(question="q2", answers=["no"] * 2 + ["yes"] * 8, image="x.png", type="yes/no", yes_no=True),
             dict(question="q3", answers="no", image="x.png", type="exist", yes_no=True),
             dict(question="q4", answers="Yes", image="x.png", type="exist", yes_no=True),
             dict(question="q5", answers="red", image="x.png", type="color", yes_no=False)]
    r = CannedRunner(dict(q1="Yes, it is.", q2="the red one is a square , so no", q3="nothing is red , so no",
                           q4="yes", q5="red"))
    rep = vqa.run(r, items)
    # official: "yes it is" matches none of the ten; q2's answer matches nothing; q3 no; q4, q5 exact
    assert rep["per_type"] == {"yes/no": 0.0, "exist": 0.5, "color": 1.0} and rep["accuracy"] == pytest.approx(2 / 5)
    assert rep["reading"].startswith("VQAv2's evaluation")
    # the verdict: q1 yes (10 of 10: 1.0), q2 no (2 of 10: 0.6), q3 no, q4 yes
    assert rep["verdict"]["per_type"] == {"yes/no": pytest.approx((1.0 + 0.6) / 2), "exist": 1.0, "color": 1.0}
    assert rep["verdict"]["reading"].startswith("ours")
