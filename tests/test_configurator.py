import json

import pytest

from configurator import configure  # noqa: E402


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
