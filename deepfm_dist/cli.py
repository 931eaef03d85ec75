"""One command-line mechanism for every console script.

A command's options are a dataclass, every field documented by the string under it (as the
training configuration in ``config.py`` is), and validated in ``__post_init__`` with a
``ValueError`` that names the flag. ``parse(prog, Options, argv)`` builds the parser from the
fields: ``--name-with-dashes`` per field; a field without a default is required; ``bool`` is a
flag; ``list[...]`` takes one or more values and may repeat; fields named in ``positional`` are
positional arguments; ``metadata={"choices": ...}`` limits the values. ``--help`` lists every
option with its documentation and default. Every error is one line, ``prog: error: ...``, and
exit status 2, as ``deepfm-train``'s.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """The documentation string under each field of the dataclass ``cls``."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


class Parser(argparse.ArgumentParser):
    """argparse with the project's error style: one line, exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def build_parser(prog: str, options: type, description: str, positional: tuple[str, ...] = ()) -> Parser:
    docs, hints = field_docs(options), typing.get_type_hints(options)
    parser = Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(options):
        tp, default = hints[f.name], _default(f)
        required = default is dataclasses.MISSING
        shown = "" if required or default in (None, "", False, [], ()) else f" (default: {default})"
        kwargs: dict[str, Any] = {"help": docs.get(f.name, "") + shown}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        if f.metadata.get("hidden"):
            kwargs["help"] = argparse.SUPPRESS
        args = typing.get_args(tp)
        if typing.get_origin(tp) is typing.Union or type(tp).__name__ == "UnionType":  # X | None
            tp = next(a for a in args if a is not type(None))
        if typing.get_origin(tp) is list:
            kwargs.update(nargs="+", type=typing.get_args(tp)[0])
            if f.name not in positional:
                kwargs.update(action="extend", default=None if required else default, required=required)
        elif tp is bool:
            kwargs.update(action="store_true")
        else:
            kwargs.update(type=f.metadata.get("parse", tp))
            if f.name not in positional:
                kwargs.update(default=None if required else default, required=required)
        if f.name in positional:
            kwargs.pop("metavar", None)
            parser.add_argument(f.name, **kwargs)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    return parser


def parse(prog: str, options: type[T], argv: list[str] | None, description: str,
          positional: tuple[str, ...] = ()) -> T:
    """The command's options from ``argv``; a bad flag or value exits with status 2."""
    parser = build_parser(prog, options, description, positional)
    namespace = parser.parse_args(argv)
    try:
        return options(**vars(namespace))
    except ValueError as e:
        parser.error(str(e))


def split_run_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(the command's own arguments, those after ``--`` that go to every training run it starts);
    ``argv`` None: the process's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
