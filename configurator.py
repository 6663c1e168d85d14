"""
nanoGPT-style configuration: a script defines its defaults as module-level globals, then calls

    config = configure(globals(), sys.argv[1:])      # python train_dft.py config/shapes_dft.py --lr=1e-4

Each argument without "--" is a Python file exec'd over the defaults; each "--key=value" overrides one default.
Unlike nanoGPT, unknown keys and wrong types are errors: a typo must not silently train with the default.
Every public global with a plain value (number, str, bool, None, list, tuple, dict) at the time of the call is a
config key, so call configure() right after the defaults and before defining other module-level values.
"""
import ast
import difflib

PLAIN_TYPES = (bool, int, float, str, type(None), list, tuple, dict)


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


def configure(globals_dict, argv):
    """Apply config files and --key=value overrides to globals_dict in place; return the resolved config dict."""
    defaults = {k: v for k, v in globals_dict.items() if not k.startswith("_") and isinstance(v, PLAIN_TYPES)}
    for arg in argv:
        if not arg.startswith("--"):
            try:
                with open(arg) as f:
                    code = f.read()
            except OSError as e:
                raise ValueError(f"cannot read config file {arg}: {e}") from e
            # exec into a scratch namespace seeded with the current values, so a file may read them; only the
            # plain values it defines or changes are applied (its imports and helper functions are ignored)
            current = {k: globals_dict[k] for k in defaults}
            scope = dict(current)
            exec(compile(code, arg, "exec"), scope)
            for k, v in scope.items():
                if not k.startswith("_") and isinstance(v, PLAIN_TYPES) and (k not in current or v is not current[k]):
                    globals_dict[k] = _check(k, v, defaults, f"set in {arg}")
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq:
            raise ValueError(f"bad argument '{arg}': write overrides as --key=value")
        if key in defaults and isinstance(defaults[key], str):
            value = text  # a str setting takes the text as written: --init_from=123 is the path "123"
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
        globals_dict[key] = _check(key, value, defaults, f"from {arg}")
    return {k: globals_dict[k] for k in defaults}
