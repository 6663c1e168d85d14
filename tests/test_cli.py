"""python -m pytest -q tests/test_cli.py

First contact: every script's --help / -h lists its settings with their defaults and exits 0; a user error
prints one line and exits 2; a real crash keeps its traceback."""
import importlib
import os
import subprocess
import sys

import pytest

import configurator
from conftest import stage_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(script, argv):
    mod = importlib.import_module(script)
    return mod.main(argv) if script != "bench" else mod.main(configurator.configure(dict(mod.DEFAULTS), argv,
                                                                                        mod.__doc__, [mod.__file__]))


@pytest.mark.parametrize("script", ["train_dpt", "train_dft", "train_sft", "evaluate", "bench", "memory", "sample", "export_hf",
                                    "experiments", "shapes"])
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
