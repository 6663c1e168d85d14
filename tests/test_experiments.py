"""python -m pytest -q tests/test_experiments.py

experiments.py at --size=test: every row trained (1-2 steps) and evaluated, the table, JSON and chart; resume;
the --jobs subprocess path (these run the whole pipeline: marked slow); the layer sets and presets of every size."""
import json
import os

import pytest
from PIL import Image

import attention_distill as ad
import evaluate
import experiments
import train_dft
import train_dpt
import train_sft
from run import configure_stage

SUBSETS = ["swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel", "add_obj", "add_att"]
COLUMNS = (["row", "setting", "seeds", "n (skipped)", "VQA", "CR avg (likelihood)"] + SUBSETS +
           ["POPE F1", "Reefknot halluc. (mean)", "align CR (paper VAT)", "align CR (img q)", "align CR (text q)",
            "final VAT loss (DFT)", "wall (s)"])
SHARED = {"match_group", "layers_intermediate", "vat_cosine", "vat_paper_form"}  # = compodistill's runs


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    argv = ["--size=test", "--seeds=1", f"--out={root / 'out'}", f"--results={root / 'results'}"]
    return root, argv, experiments.main(argv)


def table_rows(path, table=0):
    """(header, rule, rows) of the table-th markdown table in the file."""
    tables, cur = [], []
    for line in open(path).read().splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    lines = tables[table]
    split = lambda l: [c.strip() for c in l.strip("|").split("|")]
    return split(lines[0]), lines[1], [split(l) for l in lines[2:]]


@pytest.mark.slow
def test_every_row_in_table_json_and_chart(first):
    root, _, results = first
    head, rule, rows = table_rows(root / "results" / "shapes_table.md")
    assert head == COLUMNS and rule == "|" + "---|" * len(COLUMNS)
    names = ["teacher"] + [r[0] for r in experiments.ROWS]
    assert [r[0] for r in rows] == names and all(len(r) == len(COLUMNS) for r in rows)
    for r in rows:
        assert r[2].startswith("1") and ("runs of compodistill" in r[2]) == (r[0] in SHARED)
        assert r[3] == "vqa 2, cr 14, pope 6, reefknot 2"  # --limit=2 per file / CR subset / POPE split; none skipped
        assert all(c != "-" for c in r[4:6 + len(SUBSETS)] + r[-7:-5])  # VQA, CR, subsets, POPE, Reefknot everywhere
        assert (r[-2] == "-") == (r[0] in ("teacher", "sft_only", "kd", "kd_taf"))  # VAT loss iff vat_weight > 0
        assert (r[-3] == "-") == (r[-4] == "-") == (r[-5] == "-") == (r[0] == "teacher")  # alignment needs a teacher
    head, _, rel = table_rows(root / "results" / "shapes_table.md", 1)
    assert [r[0] for r in rel] == ["teacher"] + [r[0] for r in experiments.ROWS if r[1] == "main"]
    assert head[:4] == ["row", "seeds", "n (skipped)", "replace_rel"] and head[-1] == "Reefknot halluc. mean"
    assert all(c != "-" for r in rel for c in r[2:4] + r[-4:])  # n, replace_rel and every Reefknot task, every row

    saved = json.load(open(root / "results" / "shapes_results.json"))
    assert [r["name"] for r in saved["rows"]] == names
    for r in saved["rows"]:
        assert r["kind"] in ("teacher", "main", "matching", "layers", "vat_loss", "vat_form", "vat_weight", "vat_stage")
        assert [p["seed"] for p in r["per_seed"]] == [0]
        for p in r["per_seed"]:
            scores = [p[k] for k in ("vqa", "cr", "pope_f1", "pope_acc")] + list(p["cr_subsets"].values())
            scores += list(p["pope_splits"].values()) + list(p["reefknot"].values()) + list(p["vqa_types"].values())
            assert list(p["reefknot"]) == ["yesno", "mean"]  # the default world trains the yes/no form only
            assert sorted(p["pope_splits"]) == ["adversarial", "popular", "random"]
            scores += [p["align"], p["align_text"]] if r["name"] != "teacher" else []
            assert list(p["cr_subsets"]) == SUBSETS
            assert all(isinstance(x, float) and 0.0 <= x <= 1.0 for x in scores), (r["name"], scores)
            assert p["wall_s"] >= 0
        assert r["mean"]["cr"]["mean"] == r["per_seed"][0]["cr"]
        assert r["shared_with"] == ("compodistill" if r["name"] in SHARED else None)
    by = {r["name"]: r for r in saved["rows"]}
    assert by["layers_intermediate"]["per_seed"] == by["compodistill"]["per_seed"]
    assert by["vat_paper_form"]["overrides"]["dft"] == dict(vat_queries="all", vat_pool="flat")
    assert by["kd_vat_w10"]["overrides"] == dict(dpt=dict(taf=False), dft=dict(taf=False, vat_weight=10.0))
    assert by["compodistill_vat_dpt"]["overrides"] == dict(dpt=dict(vat_weight=1.0), dft={})

    png = root / "results" / "shapes_chart.png"
    assert png.stat().st_size > 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.height > 20 * len(names)

    # the runs really differ where the rows say so (read back from the checkpoints' train configs)
    seed0 = root / "out" / "test" / "seed0"
    cfg = lambda row: json.load(open(seed0 / row / "dft" / "config.json"))
    assert cfg("kd")["taf"] is False and cfg("kd_taf")["taf"] is True
    assert cfg("layers_all")["extra"]["train_config"]["teacher_layers"] == [0, 1, 2, 3, 4, 5]
    assert cfg("match_adaptive")["extra"]["train_config"]["matching"] == "adaptive"
    assert cfg("sft_only")["extra"]["train_config"]["kd_weight"] == 0.0
    assert not (seed0 / "match_group").exists() and (seed0 / "dpt_kd_taf").is_dir()


@pytest.mark.slow
def test_rerun_resumes_without_training(first, monkeypatch):
    root, argv, results = first

    def refuse(*a, **k):
        raise AssertionError("a finished stage ran again")
    for script in (train_dpt, train_dft, train_sft):
        monkeypatch.setattr(script, "main", refuse)
    monkeypatch.setattr(evaluate, "main", refuse)
    again = experiments.main(argv)
    assert [r["per_seed"][0]["cr"] for r in again] == [r["per_seed"][0]["cr"] for r in results]


@pytest.mark.slow
def test_only_published_sizes_write_to_results_by_default(first, tmp_path, monkeypatch):
    """The test size (the docstring's own command) must not overwrite the committed results/ tables: without
    --results it writes under <out>/<size>/results; the published sizes keep results/."""
    root, argv, results = first
    monkeypatch.chdir(tmp_path)  # where a relative results/ would land
    def refuse(*a, **k):
        raise AssertionError("a finished stage ran again")
    for script in (train_dpt, train_dft, train_sft):
        monkeypatch.setattr(script, "main", refuse)
    monkeypatch.setattr(evaluate, "main", refuse)
    experiments.main([a for a in argv if not a.startswith("--results=")])  # every stage done: only the tables
    assert not (tmp_path / "results").exists()
    table = root / "out" / "test" / "results" / "shapes_table.md"
    assert table_rows(table)[2] == table_rows(root / "results" / "shapes_table.md")[2]
    assert {s: experiments.results_dir(dict(experiments.DEFAULTS, size=s, out="o")) for s in experiments.SIZES} == \
        {"test": "o/test/results", "quick": "results", "full": "o/full/results", "hard": "results",
         "hard_test": "o/hard_test/results"}


@pytest.mark.slow
def test_parallel_subprocess_jobs_match_in_process(first, tmp_path):
    """--jobs=2 runs the stages as subprocesses; same seed and settings -> the same numbers as in-process."""
    root, _, results = first
    out = root / "out" / "test"
    sub = experiments.main(["--size=test", "--seeds=1", "--jobs=2", "--rows=sft_only", f"--out={tmp_path / 'out'}",
                            f"--results={tmp_path / 'res'}", f"--data={out / 'shapes'}",
                            f"--teacher={out / 'teacher'}"])
    assert [r["name"] for r in sub] == ["teacher", "sft_only"]
    assert (tmp_path / "out" / "test" / "seed0" / "sft_only" / "dft.log").is_file()
    def flat(d, path=""):  # every number of a per-seed record, by its path
        for k, v in d.items():
            if k in ("dir", "wall_s"):
                continue
            if isinstance(v, dict):
                yield from flat(v, f"{path}{k}/")
            else:
                yield f"{path}{k}", v
    # equal up to float noise (a subprocess may run with another thread count, e.g. OMP_NUM_THREADS set outside)
    a, b = dict(flat(sub[1]["per_seed"][0])), dict(flat(results[1]["per_seed"][0]))
    assert a.keys() == b.keys() and a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("size", sorted(experiments.SIZES))
def test_every_size_and_row_resolves(size):
    for stage in ("teacher", "dpt", "dft", "sft"):  # unknown keys or wrong types would raise here
        script = {"teacher": train_sft, "dpt": train_dpt, "dft": train_dft, "sft": train_sft}[stage]
        configure_stage(script.DEFAULTS, experiments.stage_args(size, stage), "", script.__file__)
    for name, kind, dpt, dft in experiments.size_rows(size):  # layer sets valid on the 4-layer student / 6-layer teacher
        c = experiments.resolved_dft(dft, size)
        s, t = ad.resolve_layers(c["student_layers"], 4), ad.resolve_layers(c["teacher_layers"], 6)
        assert len(ad.group_matching(s, t)) == len(s)
    hard = size.startswith("hard")
    files = [os.path.basename(a) for a in experiments.stage_args(size, "dft") if a.endswith(".py")]
    assert files == (["shapes_dft.py", "shapes_hard_dft.py"] if hard else ["shapes_dft.py"])
    # the teacher: the default world's in two runs (the second instruction tuning with the relation head, over the
    # first's preset and the size's overrides); the hard world's published one in a single run, unsupervised
    runs = experiments.teacher_runs(size)
    assert runs == (("teacher",) if hard else ("teacher", "teacher_it"))
    resolve = lambda argv: configure_stage(train_sft.DEFAULTS, argv, "", train_sft.__file__)
    first = resolve(experiments.teacher_args(size, "teacher", out_dir="t_pt"))
    assert first["init_from"] == "scratch" and first["privileged"] == {} and (first["look_weight"] > 0) == (not hard)
    if not hard:
        it = resolve(experiments.teacher_args(size, "teacher_it", init_from="t_pt"))
        assert it["init_from"] == "t_pt" and it["privileged"] == {"relation_head": 3}
        assert it["look_weight"] == it["readout_weight"] == 1.0 and it["lr"] == 5e-4
        assert it["max_steps"] == {"test": 2, "quick": 500, "full": 500}[size]
        assert it["llm"] == first["llm"]  # the test size's tiny LM in both runs


def test_hard_rows_and_vat_forms():
    """The hard world's table: the four modules and SFT-only (VAT in the paper's form, the default), the text-query
    form (on KD, no TAF) and the reference code's form (on KD and on KD + TAF); the VAT-weight pilot rows only when
    asked for; every row's VAT weight is the DFT preset's."""
    main = ["sft_only", "kd", "kd_taf", "kd_vat", "compodistill", "kd_vat_text_form", "kd_vat_reference_form",
            "compodistill_reference_form"]
    assert [r[0] for r in experiments.select_rows("hard")] == main
    assert [r[0] for r in experiments.select_rows("hard", "pilot")] == ["kd_vat_w1", "kd_vat_w3", "kd_vat_w10",
                                                                        "kd_vat_w30"]
    assert [r[0] for r in experiments.select_rows("hard", "main,kd_vat_w3")] == main[:5] + ["kd_vat_w3"]
    c = {name: experiments.resolved_dft(dft, "hard") for name, _, _, dft in experiments.size_rows("hard")}
    form = lambda row: (c[row]["vat_queries"], c[row]["vat_pool"])
    assert form("kd_vat") == form("compodistill") == ("all", "flat") and c["kd_vat"]["taf"] is False
    assert form("kd_vat_text_form") == ("text", "flat")
    assert form("kd_vat_reference_form") == form("compodistill_reference_form") == ("image", "column")
    dpt = {name: variant for name, _, variant, _ in experiments.size_rows("hard")}  # TAF comes with the DPT run
    assert dpt["compodistill_reference_form"] == dpt["compodistill"] == "kd_taf" and not experiments.DPT["kd_taf"]
    w = c["kd_vat"]["vat_weight"]
    assert w > 0 and all(c[n]["vat_weight"] == w for n in main[3:])
    assert c["kd"]["vat_weight"] == c["kd_taf"]["vat_weight"] == 0


@pytest.mark.slow
def test_hard_size_end_to_end(tmp_path):
    """One hard-world row at the tiny size: its world (patch-evidence tower, 4x4 grid), its presets, its seed, its
    results files."""
    res = experiments.main(["--size=hard_test", "--seeds=1", "--ablation_seeds=1", "--seed_offset=7",
                            "--rows=kd_vat_text_form", f"--out={tmp_path / 'out'}", f"--results={tmp_path / 'res'}"])
    assert [r["name"] for r in res] == ["teacher", "kd_vat_text_form"] and res[1]["seeds"] == [7]
    base = tmp_path / "out" / "hard_test"
    meta = json.load(open(base / "shapes" / "meta.json"))
    assert meta["grid"] == 4 and meta["world"]["tower_labels"] == "blocks+shape"
    tower = json.load(open(base / "shapes" / "vision_tower" / "config.json"))
    assert (tower["image_size"], tower["patch_size"]) == (32, 8)
    cfg = json.load(open(base / "seed7" / "kd_vat_text_form" / "dft" / "config.json"))["extra"]["train_config"]
    assert (cfg["vat_queries"], cfg["vat_pool"], cfg["seed"]) == ("text", "flat", 7)
    head, _, rows = table_rows(tmp_path / "res" / "shapes_hard_table.md")
    assert head == COLUMNS and [r[0] for r in rows] == ["teacher", "kd_vat_text_form"]
    assert rows[1][COLUMNS.index("align CR (text q)")] != "-"
    assert (tmp_path / "res" / "shapes_hard_chart.png").stat().st_size > 0


def test_tables_show_n_and_skipped_items(tmp_path):
    """Both tables carry each task's n and the items skipped (a missing or unreadable image), from the reports."""
    def report(skipped):
        per = lambda n: dict(n=n, acc=0.5)
        pope = dict(n=6, accuracy=0.5, precision=0.5, recall=0.5, f1=0.5, yes_ratio=0.5)
        return dict(vqa=dict(n=4, accuracy=0.25, per_type={}),
                    cr=dict(subsets=["swap_obj"], likelihood=dict(avg=0.5, per_subset={"swap_obj": per(3)})),
                    pope=dict(generate=dict(per_split={"random": pope}, avg=dict(pope, n=6))),
                    reefknot=dict(yesno=dict(n=2, accuracy=1.0, hallucination_rate=0.0),
                                  mean=dict(accuracy=1.0, hallucination_rate=0.0, tasks=["yesno"])),
                    skipped=skipped)
    rows = []
    for name, kind, skipped in (("teacher", "teacher", {}), ("kd", "main", {"pope": 2})):
        per = [dict(seed=0, wall_s=1.0, **experiments.metrics(report(skipped), "likelihood"))]
        mean = {k: experiments.summary(per, k) for k in experiments.SCORES + ["vat_final", "wall_s"]}
        mean.update({k: {n: experiments.summary(per, k, n) for n in per[0].get(k, {})} for k in experiments.NESTED})
        rows.append(dict(name=name, kind=kind, setting="s", shared_with=None, seeds=[0], per_seed=per, mean=mean))
    opts = dict(experiments.DEFAULTS, size="test", results=str(tmp_path))
    experiments.write_results(opts, rows, ["swap_obj"], "header", {})
    for table in (0, 1):
        head, _, got = table_rows(tmp_path / "shapes_table.md", table)
        col = head.index("n (skipped)")
        assert [r[col] for r in got] == ["vqa 4, cr 3, pope 6, reefknot 2", "vqa 4, cr 3, pope 6 (2 skipped), reefknot 2"]
