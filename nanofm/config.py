"""One dataclass per script <-> command-line flags.

Each top-level script declares its settings as a dataclass at the top of the file, with a
default and a `# comment` on each field. `parse_config(MyConfig)` turns that dataclass into
command-line flags, so the script documents itself (`--help` shows the comments):

    @dataclass
    class PrepareConfig:
        vocab_size: int = 8192  # BPE vocabulary size, special tokens included

    cfg = parse_config(PrepareConfig)   # python data/prepare.py --vocab_size=4096

Design decisions:
- argparse does the parsing (`--name=value` and `--name value` both work); we only map the
  dataclass onto it. Abbreviated flags are refused: `--vocab` must not silently mean
  `--vocab_size`.
- An unknown flag is an error naming the closest valid flags (difflib), because a typo that is
  silently ignored costs a whole training run.
- `--config=file.json` supplies values first; flags on the command line override it. Unknown
  keys in the file are errors too.
- bool fields accept `--flag` (true), `--flag=false`; list fields repeat (`--input a --input b`);
  Optional fields accept `none`.
- A bad flag or value raises ConfigError (nanofm/common.py), which the scripts print as
  `error: ...` and exit 1, like every other user error (argparse itself would exit 2).
- `config_to_dict` gives the resolved config as plain JSON for `meta.json` and reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from nanofm.common import ConfigError


def field_comments(cls) -> dict[str, str]:
    """The `# comment` written after each field in the dataclass source, used as --help text."""
    comments = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins over its parent's
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
            if match:
                comments[match.group(1)] = match.group(2).strip()
    return comments


def _unwrap_optional(tp):
    """Optional[X] -> (X, True); X -> (X, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(tp):
    """A function str -> value for one field type (used by argparse and for JSON values)."""
    base, optional = _unwrap_optional(tp)
    if typing.get_origin(base) is list:
        base = typing.get_args(base)[0] if typing.get_args(base) else str
    scalar = _parse_bool if base is bool else base

    def convert(text):
        if optional and str(text).strip().lower() == "none":
            return None
        try:
            return scalar(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from exc

    convert.__name__ = getattr(base, "__name__", "value")
    return convert


def _check_json_value(name: str, tp, value):
    """Type-check a value read from --config=file.json; returns it (ints accepted for floats)."""
    base, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None
    if typing.get_origin(base) is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {name!r} must be a list, got {value!r}")
        item = typing.get_args(base)[0] if typing.get_args(base) else str
        return [_check_json_value(name, item, v) for v in value]
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base in (int, float, str, bool) and (type(value) is not base):
        raise ConfigError(f"config key {name!r} must be {base.__name__}, got {value!r}")
    return value


# names other frameworks use for our settings (Hugging Face, PyTorch Lightning, nanoGPT's configurator)
SYNONYMS = {"learning_rate": "lr", "max_steps": "max_iters", "num_steps": "max_iters", "steps": "max_iters",
            "output_dir": "out_dir", "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
            "warmup_steps": "warmup_iters", "max_grad_norm": "grad_clip", "eval_steps": "eval_interval",
            "save_steps": "checkpoint_interval", "logging_steps": "log_interval", "resume_from_checkpoint": "init_from"}


def fill_unset(cfg, defaults: dict) -> None:
    """Give the settings left as None the values of `defaults` (what a stage's task or algorithm
    wants: train_sft's TASK_DEFAULTS, train_rlhf's ALGO_DEFAULTS); settings given on the command
    line are kept."""
    for name, value in defaults.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)


def closest(name: str, valid: list[str], prefix: str = "--") -> str:
    """'; did you mean --a, --b?' naming the valid names closest to a wrong one, or ''."""
    if SYNONYMS.get(name) in valid:
        return f"; did you mean {prefix}{SYNONYMS[name]}?"
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    if not close:  # a wrong separator ("vocab-size") or a prefix of a valid name
        close = [v for v in valid if name.replace("-", "_") in v][:3]
    return f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a usage error raises ConfigError instead of exiting with status 2."""

    def error(self, message):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def build_parser(cls, description: str | None = None) -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    parser = ArgumentParser(
        description=description or (cls.__doc__ or "").strip(),
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.json", default=None,
                        help="read settings from a JSON file; flags given here override it")
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        base, _ = _unwrap_optional(tp)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kwargs = dict(dest=f.name, type=_converter(tp), default=argparse.SUPPRESS,
                      help=(comments.get(f.name, "") + f" (default: {default!r})").strip())
        if typing.get_origin(base) is list:
            kwargs["action"] = "append"
            kwargs["metavar"] = f.name.upper()
        elif base is bool:
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_config(cls, argv: list[str] | None = None, description: str | None = None):
    """Parse command-line flags (and an optional --config file) into an instance of `cls`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(cls, description)
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)

    args, unknown = parser.parse_known_args(argv)
    for token in unknown:
        if token.startswith("-"):
            flag = token.lstrip("-").split("=", 1)[0]
            parser.error(f"unknown flag --{flag}{closest(flag, names)}")
        parser.error(f"unexpected argument {token!r} (settings are given as --name=value)")

    values: dict = {}
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            parser.error(f"--config file {path} does not exist")
        try:
            from_file = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            parser.error(f"--config file {path} is not valid JSON: {exc}")
        if not isinstance(from_file, dict):
            parser.error(f"--config file {path} must hold a JSON object of settings")
        for key, value in from_file.items():
            if key not in names:
                parser.error(f"unknown key {key!r} in {path}{closest(key, names)}")
            try:
                values[key] = _check_json_value(key, hints[key], value)
            except ValueError as exc:
                parser.error(str(exc))
    values.update({k: v for k, v in vars(args).items() if k != "config"})
    try:
        return cls(**values)
    except ConfigError:  # __post_init__ validation names the bad setting
        raise
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))


def config_to_dict(cfg) -> dict:
    """The resolved config as plain JSON-able data, for meta.json and reports."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
