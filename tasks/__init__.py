"""
The benchmarks, one file each with its reader, its scorer and its metric (nanochat's tasks/ way); evaluate.py runs them.

    vqa.py         VQAv2-style VQA, scored as VQAv2's vqaEval.py scores it
    cr.py          SugarCrepe-style compositional reasoning (MCQ in both orders, caption likelihood)
    pope.py        POPE, read as POPE's evaluate.py reads answers
    winoground.py  Winoground / BiVLC-style pairs (text / image / group scores)
    reefknot.py    Reefknot relation hallucination, read as Reefknot's utils.py reads answers
    common.py      what they share: reading the files, images checked before the run, answers from --predictions

Each benchmark file has load(...) -> (items, skipped count), run(runner, items, ...) -> its report, and
markdown(report, skipped) -> its section of report.md. They never import evaluate.py.
"""
from tasks import cr, pope, reefknot, vqa, winoground

BENCHMARKS = dict(vqa=vqa, cr=cr, pope=pope, wino=winoground, reefknot=reefknot)  # task name -> its file, report order
