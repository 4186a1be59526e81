"""One convention for the values of `podkv` flags: lists are comma-separated, ``1k`` = 1024.

``--lengths 1k,2048,4K`` is (1024, 2048, 4096) in every command; ``--methods dense,pod`` is a tuple of
names. Paths stay space-separated (``nargs="+"``: ``--files a.txt b.txt``) because a path may hold a comma.

The parsers are argparse *actions*, not ``type=`` functions, on purpose: a bad value raises
:class:`PodError`, which is a ``ValueError``, and argparse replaces the message of a ValueError raised by
``type=`` with "invalid _ints value: ...". argparse does not catch what an action raises, so the PodError
reaches ``podkv.cli.main`` and is printed as the one line it is, naming the flag and the bad value (exit 2).
Defaults are given already parsed (``default=(1024, 2048)``): argparse passes them through untouched.
"""

from __future__ import annotations

import argparse

from podkv.errors import PodError

KILO = 1024


def split(text: str) -> list[str]:
    """The items of a comma list; spaces count as commas, empty items are dropped."""
    return [x for x in str(text).replace(" ", ",").split(",") if x]


def parse_int(text: str, flag: str = "value") -> int:
    """An integer, ``1k`` / ``4K`` meaning 1024 / 4096 (token counts are powers of two)."""
    item = str(text).strip().lower()
    scale = KILO if item.endswith("k") else 1
    try:
        return int(item[:-1] if scale > 1 else item) * scale
    except ValueError:
        raise PodError(f"{flag}: {text!r} is not an integer (like 1024 or 1k = 1024)") from None


def parse_ints(text: str, flag: str = "value") -> tuple[int, ...]:
    out = []
    for item in _items(text, flag, "integers like 1024,2k (1k = 1024)"):
        try:
            out.append(parse_int(item, flag))
        except PodError:
            raise PodError(f"{flag}: {item!r} is not an integer; give comma-separated integers like 1024,2k "
                           f"(1k = 1024), got {text!r}") from None
    return tuple(out)


def parse_floats(text: str, flag: str = "value") -> tuple[float, ...]:
    out = []
    for item in _items(text, flag, "numbers like 0,0.5,1"):
        try:
            out.append(float(item))
        except ValueError:
            raise PodError(f"{flag}: {item!r} is not a number; give comma-separated numbers like 0,0.5,1, "
                           f"got {text!r}") from None
    return tuple(out)


def parse_names(text: str, flag: str = "value") -> tuple[str, ...]:
    return tuple(_items(text, flag, "names like dense,pod"))


def _items(text: str, flag: str, example: str) -> list[str]:
    items = split(text)
    if not items:
        raise PodError(f"{flag}: empty list; give comma-separated {example}")
    return items


class _Parsed(argparse.Action):
    """Store ``parse(value, flag)``; its PodError escapes argparse (see the module docstring)."""

    parse = staticmethod(parse_names)
    default_metavar = "A,B"

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.setdefault("metavar", self.default_metavar)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, type(self).parse(values, option_string or self.dest))


def _action(name: str, parse, metavar: str) -> type:
    return type(name, (_Parsed,), {"parse": staticmethod(parse), "default_metavar": metavar,
                                   "__doc__": f"Store {parse.__name__}(value, flag)."})


Int = _action("Int", parse_int, "N")  # one integer that may be written 4k (token counts)
Ints = _action("Ints", parse_ints, "N,N")
Floats = _action("Floats", parse_floats, "X,X")
Names = _action("Names", parse_names, "NAME,NAME")
