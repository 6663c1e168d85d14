"""
    python -m pytest -q tests/test_configurator.py

configurator.py: --key=value and config-file overrides with their type checks, every script's --help / -h (each
setting, its default, its comment), user errors as one line with exit 2 (each rank naming itself), real crashes with
their traceback.
"""
import importlib
import json
import os
import subprocess
import sys

import pytest

import configurator
from configurator import configure  # noqa: E402
from conftest import ROOT, stage_main


def defaults():
    # what a training script's globals look like: settings, plus things that are not settings
    return dict(lr=2e-4, batch_size=8, taf=True, out_dir="out/dft", init_from=None, vat_layers=(8, 14),
                betas=[0.9, 0.95], json=json, _private=1, __name__="__main__")


def test_overrides_parse_and_convert():
    g = defaults()
    cfg = configure(g, ["--lr=1", "--batch_size=16", "--taf=False", "--out_dir=out/123", "--init_from=out/dpt",
                        "--vat_layers=[1, 2]", "--betas=(0.8, 0.9)"])
    assert cfg == dict(lr=1.0, batch_size=16, taf=False, out_dir="out/123", init_from="out/dpt", vat_layers=(1, 2),
                       betas=[0.8, 0.9])
    assert type(g["lr"]) is float and g["taf"] is False and g["vat_layers"] == (1, 2)
    assert json.loads(json.dumps(cfg))["vat_layers"] == [1, 2]  # saveable as-is
    assert configure(defaults(), ["--out_dir=7"])["out_dir"] == "7"  # a str setting keeps the text
    assert configure(defaults(), ["--init_from=3"])["init_from"] == 3  # a None default takes any type


@pytest.mark.parametrize("arg, msg", [
    ("--batch_size=2.5", "'batch_size'.*expects int.*got float 2.5"),
    ("--taf=1", "'taf'.*expects bool.*got int 1"),
    ("--lr=True", "'lr'.*expects float.*got bool True"),
    ("--lr=fast", "'lr'.*expects float.*got str 'fast'"),
    ("--batch_size=None", "'batch_size'.*expects int.*got NoneType"),
])
def test_type_errors(arg, msg):
    with pytest.raises(ValueError, match=msg):
        configure(defaults(), [arg])


def test_unknown_keys_and_bad_syntax():
    with pytest.raises(ValueError, match="unknown config key 'batchsize'.*did you mean batch_size"):
        configure(defaults(), ["--batchsize=4"])
    with pytest.raises(ValueError, match="unknown config key 'zzz'.*known keys: batch_size, betas, init_from"):
        configure(defaults(), ["--zzz=4"])
    with pytest.raises(ValueError, match="unknown config key '_private'"):  # private names are not settings
        configure(defaults(), ["--_private=2"])
    with pytest.raises(ValueError, match="write overrides as --key=value"):
        configure(defaults(), ["--lr", "1e-3"])


def test_config_file_then_override(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("import math\nbatch_size = 4\nlr = 1e-3 * math.sqrt(batch_size)\nout_dir = out_dir + '_small'\n"
                 "def helper():\n    return 1\n")
    g = defaults()
    cfg = configure(g, [str(f), "--batch_size=32"])  # later arguments win
    assert cfg["batch_size"] == 32 and cfg["lr"] == pytest.approx(2e-3) and cfg["out_dir"] == "out/dft_small"
    assert "math" not in cfg and "helper" not in cfg and "helper" not in g
    assert set(cfg) == {"lr", "batch_size", "taf", "out_dir", "init_from", "vat_layers", "betas"}

    bad = tmp_path / "bad.py"
    bad.write_text("learning_rate = 1e-3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rate' \(set in .*bad.py\)"):
        configure(defaults(), [str(bad)])
    bad.write_text("taf = 'yes'\n")
    with pytest.raises(ValueError, match="'taf'.*expects bool.*got str 'yes'"):
        configure(defaults(), [str(bad)])
    with pytest.raises(ValueError, match="cannot read config file .*nope.py"):
        configure(defaults(), [str(tmp_path / "nope.py")])


def test_help_after_a_config_file_shows_its_values_and_comments(tmp_path, capsys):
    src = tmp_path / "script.py"
    src.write_text("lr = 2e-4        # peak learning rate\nbatch_size = 8  # samples per batch\n")
    preset = tmp_path / "preset.py"
    preset.write_text("lr = 2e-5  # full fine-tuning's rate\nbatch_size = 4\n")
    with pytest.raises(SystemExit) as e:
        configure(dict(lr=2e-4, batch_size=8), [str(preset), "--batch_size=2", "--help"], "", [str(src)])
    assert e.value.code == 0
    rows = [l.split(None, 1) for l in capsys.readouterr().out.splitlines() if l.startswith("  ")]
    # the preset's value and comment; a setting it leaves uncommented keeps the script's comment; --key=value is not
    # applied to what --help shows
    assert rows == [["lr=2e-05", "full fine-tuning's rate"], ["batch_size=4", "samples per batch"]]


def test_help_comments_come_from_the_settings_alone(tmp_path):
    """Each key's comment is the one beside it in the settings (the DEFAULTS dict, or a config file's top-level
    assignments) with the comment-only lines indented under it; a line elsewhere in the file that assigns a name
    like a key (`lr = lr_at(...)  # ...` in a function) is not the key's comment."""
    from configurator import comments
    src = tmp_path / "script.py"
    src.write_text(
        "DEFAULTS = dict(\n"
        "    # -- optimisation --------\n"
        "    lr=2e-4,          # peak learning rate\n"
        "    out_dir='out/#1', # where it writes:\n"
        "                      # a directory\n"
        "    seed=0,\n"
        "                      # not seed's: seed has no comment of its own\n"
        "    batch_size=dict(a=1,  # per step\n"
        "                    b=2),\n"
        "                      # (and per rank)\n"
        "    # -- bookkeeping --------\n"
        "    log_interval=10,  # steps between log lines\n"
        ")\n"
        "OTHER = dict(lr=1)    # not a setting\n"
        "\n"
        "def train(cfg):\n"
        "    lr = cfg['lr']    # skipped: steps in which no rank had a sample\n"
        "    seed = 3          # a local\n"
        "    return lr\n")
    keys = ["lr", "out_dir", "seed", "batch_size", "log_interval", "max_steps"]
    assert comments([str(src)], keys) == {"lr": "peak learning rate", "out_dir": "where it writes: a directory",
                                          "batch_size": "per step (and per rank)",
                                          "log_interval": "steps between log lines"}
    preset = tmp_path / "preset.py"
    preset.write_text("max_steps = 100   # short\n"
                      "                  # for a test\n"
                      "# lr = 1e-3       (commented out: not lr's)\n"
                      "seed = 1\n"
                      "if True:\n"
                      "    lr = 3e-4     # inside a block: still a top-level setting of the file\n")
    assert comments([str(src), str(preset)], keys) == {
        "lr": "inside a block: still a top-level setting of the file", "out_dir": "where it writes: a directory",
        "batch_size": "per step (and per rank)", "log_interval": "steps between log lines",
        "max_steps": "short for a test"}


def test_train_dft_help_shows_each_keys_own_comment(capsys):
    import train_dft
    with pytest.raises(SystemExit):
        train_dft.main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    # the stage script's own comment where it sets a key; the shared one (run.DEFAULTS) elsewhere
    assert [l.split(None, 1)[1] for l in lines if l.startswith("  lr=")] == [
        "peak learning rate (AdamW): a small LM from scratch takes a high one"]
    assert [l.split(None, 1)[1] for l in lines if l.startswith("  beta1=")] == ["AdamW's beta1"]
    # a comment that goes on over the lines below its key: whole
    at = lines.index(next(l for l in lines if l.startswith("  vision_model=")))
    assert " ".join(l.strip() for l in lines[at:at + 2]).endswith(
        "or a LLaVA / checkpoint directory, whose tower it takes")


# -- the command line: help, user errors, crashes ----------------------------------------------------------------------

def run_main(script, argv):
    mod = importlib.import_module(script)
    return mod.main(argv) if script != "bench" else mod.main(configurator.configure(dict(mod.DEFAULTS), argv,
                                                                                        mod.__doc__, [mod.__file__]))


@pytest.mark.parametrize("script", ["train_dpt", "train_dft", "train_sft", "evaluate", "bench", "memory", "sample",
                                    "export_hf", "experiments", "shapes"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_setting_and_exits_0(script, flag, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(script, [flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    mod = importlib.import_module(script)
    defaults = mod.DEFAULTS
    assert out.startswith(mod.__doc__.strip()[:40]) and "usage: python " in out
    for k, v in defaults.items():  # one line each: the setting, its default, what it does
        line = next(line for line in out.splitlines() if line.startswith(f"  {k}={v!r}"))
        assert len(line.split(None, 1)) == 2, f"{script}: {k} has no description"


def test_user_errors_are_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        configurator.cli(lambda: stage_main({}, ["--lr=fast"]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("config key 'lr' (from --lr=fast) expects float like the default 0.0002, got str 'fast'")
    assert len(err.splitlines()) == 1


def test_under_torchrun_every_rank_names_itself(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # an error of rank 1 alone must not go unsaid
    with pytest.raises(SystemExit):
        configurator.cli(lambda: stage_main({}, ["--lr=fast"]))
    # on a line of its own (see test_an_error_is_one_write_on_a_line_of_its_own)
    assert capsys.readouterr().err.startswith(f"\n{os.path.basename(sys.argv[0])} [rank 1]: config key 'lr'")


class Recorder:
    """A stderr that keeps each write() call apart."""
    def __init__(self):
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return len(s)

    def flush(self):
        pass


def test_an_error_is_one_write_on_a_line_of_its_own(monkeypatch):
    """Under torchrun the ranks share one stderr, and rank 0's progress bar leaves the cursor mid-line: each error is
    one write (two ranks' messages cannot interleave) that starts on a new line and ends with a newline. One process
    without a progress bar open prints just the message."""
    from tqdm import tqdm
    script = os.path.basename(sys.argv[0])
    err = Recorder()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(configurator, "raised_here", lambda e: True)  # as if one of our checks raised it

    def fail():
        raise ValueError("data.json: 3 of 4 samples read cannot be used\n  first one\n  second one")
    with pytest.raises(SystemExit):
        configurator.cli(fail)
    assert err.writes == [f"{script}: data.json: 3 of 4 samples read cannot be used\n  first one\n  second one\n"]

    err.writes.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        configurator.cli(fail)
    assert err.writes == [f"\n{script} [rank 1]: data.json: 3 of 4 samples read cannot be used\n  first one\n"
                          "  second one\n"]

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    bar = tqdm(total=10, desc="dft", file=err)  # one process: its own bar is mid-line when the error comes
    bar.update(3)
    err.writes.clear()
    with pytest.raises(SystemExit):
        configurator.cli(fail)
    said = list(err.writes)
    bar.close()
    assert len(said) == 1 and said[0].startswith(f"\n{script}: data.json: ") and said[0].endswith("second one\n")


def test_real_crashes_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        configurator.cli(lambda: 1 / 0)
    with pytest.raises(ValueError):  # raised by Python itself, not by one of our checks
        configurator.cli(lambda: int("x"))


@pytest.mark.slow
def test_a_stage_script_with_a_bad_setting_exits_2_without_a_traceback(tmp_path):
    # its own out_dir: a run of the embedded default in out/shapes/dft would be resumed (and refused) instead
    r = subprocess.run([sys.executable, "train_dft.py", "--init_from=nowhere", "--teacher=", "--kd_weight=0",
                        "--vat_weight=0", f"--out_dir={tmp_path / 'dft'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("train_dft.py: init_from='nowhere': no checkpoint there; run the previous stage first "
                                "(it writes its out_dir), or use init_from=backbones or scratch")
