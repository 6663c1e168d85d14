"""
    OMP_NUM_THREADS=1 python -m pytest -q tests/test_tasks_cr.py

tasks/cr.py: MCQ answers parsed to options, and the both-order accuracy.
"""
from tasks import cr


def test_mcq_parsing():
    caps = ("a red circle left of a blue square", "a blue circle left of a red square")
    cases = {"A": 0, "a": 0, "(a)": 0, "A.": 0, "a)": 0, "(A) a red circle": 0, "Answer: A": 0,
             "B": 1, "b": 1, "(B)": 1, "B.": 1, "b red circle": 1, "The answer is (B).": 1,
             # a leading article is not option A; a repeated caption picks its option
             "a red circle": -1, "a red circle left of a blue square": 0, "A blue circle left of a red square.": 1,
             "a green star": -1, "": -1, "apple": -1, "both": -1}
    for answer, want in cases.items():
        assert cr.parse_choice(answer, caps) == want, answer
    # one caption inside the other (an added object): the longer one that was said wins
    assert cr.parse_choice("a dog and a cat", ("a dog", "a dog and a cat")) == 1
    assert cr.parse_choice("a dog", ("a dog", "a dog and a cat")) == 0


def test_mcq_both_order_averaging():
    first = [0, 0, 1, -1]   # positive shown as (A): right, right, wrong, invalid
    second = [1, 0, 1, 1]   # positive shown as (B): right, wrong, right, right
    m = cr.mcq_accuracy(first, second)
    assert m["acc_pos_first"] == 0.5 and m["acc_pos_second"] == 0.75 and m["acc"] == 0.625
    assert m["both"] == 0.25 and m["invalid"] == 1 / 8 and m["n"] == 4
    # a model that always says "A" is at chance, whatever its first-order accuracy
    assert cr.mcq_accuracy([0] * 5, [0] * 5)["acc"] == 0.5
