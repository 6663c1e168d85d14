"""
Settings for every script, nanoGPT style. A script lists its settings once, as a dict of defaults with a comment on
each line, then reads the command line:

    cfg = configure(DEFAULTS, sys.argv[1:], __doc__, [__file__])   # python train_dft.py config/shapes_dft.py --lr=1e-4

Each argument without "--" is a Python file exec'd over the defaults (config/*.py); each "--key=value" overrides one
setting. Unlike nanoGPT, unknown keys and wrong types are errors: a typo must not silently train with the default.
-h / --help prints the script's docstring and every setting with its default and the comment beside it (with config
files on the command line: their values, and their comments where they have one).

cli(main) runs a script's main(): an error raised by this project's own checks (a bad setting, a missing file, settings
that cannot work together) prints one message and exits with code 2; an error raised anywhere else (PyTorch,
transformers) is a real crash and keeps its traceback.
"""
import ast
import difflib
import io
import os
import sys
import textwrap
import tokenize

PLAIN_TYPES = (bool, int, float, str, type(None), list, tuple, dict)
HERE = os.path.dirname(os.path.abspath(__file__))


def _check(key, value, defaults, source):
    """Return value converted to the default's type where that is lossless, else raise naming key and types."""
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(defaults))}"
        raise ValueError(f"unknown config key '{key}' ({source}){hint}")
    default = defaults[key]
    if default is None or type(value) is type(default):
        return value
    if type(default) is float and type(value) is int:  # --lr=1 means 1.0; bool is excluded by the exact type test
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    raise ValueError(f"config key '{key}' ({source}) expects {type(default).__name__} like the default "
                     f"{default!r}, got {type(value).__name__} {value!r}")


def comments(sources, keys):
    """{key: its comment} from source files: the comment on the line that sets it, and the comment-only lines right
    below, indented past the key (its continuation). Only what sets a setting counts: a top-level `key = value` (a
    config file) or a key=value of the top-level DEFAULTS = dict(...) (a script's settings); a line elsewhere that
    assigns a name like a key (a local `lr = ...` in a function) does not. A later file's comment wins."""
    found = {}
    for path in sources:
        with open(path) as f:
            text = f.read()
        notes, code_lines = {}, set()  # line -> (column, comment text); lines holding code
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            if t.type == tokenize.COMMENT:
                notes[t.start[0]] = (t.start[1], t.string.lstrip("#").strip())
            elif t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
                code_lines.update(range(t.start[0], t.end[0] + 1))
        for key, (first, last, col) in _settings_in(ast.parse(text), keys).items():
            if first not in notes:
                continue
            parts, n = [notes[first][1]], last + 1
            while n in notes and n not in code_lines and notes[n][0] > col:
                parts.append(notes[n][1])
                n += 1
            found[key] = " ".join(p for p in parts if p)
    return found


def _settings_in(tree, keys):
    """{key: (first line, last line, column)} of each setting a module sets: `key = value` at its top level (not in a
    function or class), or key=value in DEFAULTS = dict(...) / {...}. The last one of a key wins, as when it runs."""
    found = {}

    def visit(body):
        for node in body:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id in keys:
                        found[target.id] = (node.lineno, node.end_lineno, node.col_offset)
                    if isinstance(target, ast.Name) and target.id == "DEFAULTS":
                        v = node.value
                        if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "dict":
                            pairs = [(kw.arg, kw, kw.value) for kw in v.keywords]
                        elif isinstance(v, ast.Dict):
                            pairs = [(k.value, k, val) for k, val in zip(v.keys, v.values)
                                     if isinstance(k, ast.Constant)]
                        else:
                            pairs = []
                        for name, at, value in pairs:
                            if name in keys:
                                found[name] = (at.lineno, value.end_lineno, at.col_offset)
            elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for field in ("body", "orelse", "finalbody"):  # if / for / while / with / try blocks run at top level
                    visit(getattr(node, field, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
    visit(tree.body)
    return found


def usage(defaults, doc="", sources=()):
    """The --help text: the docstring, then each setting, its default and its comment."""
    help_ = comments(sources, defaults)
    width = min(34, max(len(f"{k}={v!r}") for k, v in defaults.items()) + 2)
    rows = []
    for k, v in defaults.items():
        text = textwrap.wrap(help_.get(k, ""), 110 - width) or [""]
        rows.append(f"  {f'{k}={v!r}':<{width}} {text[0]}".rstrip())
        rows += [" " * (width + 3) + t for t in text[1:]]
    return (doc.strip() + "\n\n" if doc else "") + \
        f"usage: python {os.path.basename(sys.argv[0])} [config/file.py ...] [--key=value ...]\n\n" \
        "settings (default, then what it does):\n" + "\n".join(rows)


def configure(defaults, argv, doc="", sources=(), kinds=None):
    """Apply config files and --key=value overrides to the dict `defaults` in place; return the resolved settings.
    -h / --help prints usage(defaults, doc, sources) and exits; with config files, their values and comments.
    `kinds`: where a default's type is not the setting's (a stage's list of layers, where a name or None would do
    too), the dict whose values' types are checked instead."""
    help_ = any(a in ("-h", "--help") for a in argv)
    keys = {k: v for k, v in defaults.items() if not k.startswith("_") and isinstance(v, PLAIN_TYPES)}
    kinds = {**keys, **{k: v for k, v in (kinds or {}).items() if k in keys}}
    files = [a for a in argv if not a.startswith("-")]
    for arg in files if help_ else argv:
        if not arg.startswith("--"):
            try:
                with open(arg) as f:
                    code = f.read()
            except OSError as e:
                raise ValueError(f"cannot read config file {arg}: {e}") from e
            # exec into a scratch namespace seeded with the current values, so a file may read them; only the
            # plain values it defines or changes are applied (its imports and helper functions are ignored)
            current = {k: defaults[k] for k in keys}
            scope = dict(current)
            exec(compile(code, arg, "exec"), scope)
            for k, v in scope.items():
                if not k.startswith("_") and isinstance(v, PLAIN_TYPES) and (k not in current or v is not current[k]):
                    defaults[k] = _check(k, v, kinds, f"set in {arg}")
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq:
            raise ValueError(f"bad argument '{arg}': write overrides as --key=value (--help lists them)")
        if key in keys and isinstance(keys[key], str):
            value = text  # a str setting takes the text as written: --init_from=123 is the path "123"
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
        defaults[key] = _check(key, value, kinds, f"from {arg}")
    if help_:
        print(usage(defaults, doc, [*sources, *files]))
        raise SystemExit(0)
    return {k: defaults[k] for k in keys}


def raised_here(e):
    """True when exception `e` was raised by this project's own code (the innermost frame is one of our files)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.dirname(os.path.abspath(tb.tb_frame.f_code.co_filename)) == HERE


def cli(main):
    """Run a script's main(). Our own checks' errors are the user's to fix: one message (from each rank under
    torchrun), exit code 2, no traceback. Anything else is a crash and keeps its traceback."""
    try:
        return main()
    except (ValueError, FileNotFoundError, ImportError) as e:
        if not raised_here(e):
            raise
        rank = os.environ.get("RANK", "0")  # under torchrun every rank says it: it may be one rank's error alone
        where = "" if os.environ.get("WORLD_SIZE", "1") == "1" else f" [rank {rank}]"
        # One write, so that two ranks' messages on the shared stderr cannot interleave, starting on a line of its
        # own where a progress bar (this process's, or rank 0's under torchrun) may have left the cursor mid-line
        fresh = "\n" if where or _bar_open() else ""
        sys.stderr.write(f"{fresh}{os.path.basename(sys.argv[0])}{where}: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2)


def _bar_open():
    """True when this process shows a tqdm progress bar (one that an error ended is never closed)."""
    tqdm = sys.modules.get("tqdm")
    return bool(tqdm and getattr(tqdm.tqdm, "_instances", None))
