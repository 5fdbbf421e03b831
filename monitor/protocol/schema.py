"""One schema engine for everything that comes in: msgspec typed Structs.

The wire contract (`monitor.protocol.messages`), the catch-up and acknowledgement requests, and the
three YAML files (config.yaml, alert.yaml, fleet.yaml) are each a tree of
``msgspec.Struct`` types with ``forbid_unknown_fields``; decoding checks types, ranges
(``Meta(ge=, le=)``), finiteness, enums (``Literal``), lengths and patterns, and a refusal
is one line naming the key path (``$.events.classes.fall.threshold``).

Nesting depth: msgspec's JSON decoder is C and never recurses in Python, but decoding into
``Any`` recurses in C up to Python's recursion limit and then raises RecursionError. No
schema here holds ``Any``, so a wire body can nest no deeper than its type: a body of
200,000 ``[`` is refused at its first byte that does not fit.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import msgspec.inspect
from msgspec import Meta

T = TypeVar("T")

SENSOR_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
"""Sensor and machine names: letters, digits and ``_.-``, up to 64, not starting with a sign."""

Finite = Annotated[float, Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
"""A float that is neither NaN nor infinite (msgspec's range checks refuse both)."""
NonNegative = Annotated[float, Meta(ge=0.0, le=sys.float_info.max)]
Positive = Annotated[float, Meta(gt=0.0, le=sys.float_info.max)]
Count = Annotated[int, Meta(ge=0)]
SensorId = Annotated[str, Meta(pattern=SENSOR_ID_PATTERN)]
Name = Annotated[str, Meta(min_length=1, max_length=200)]
ENDPOINT_PATTERN = r"^(tcp|ipc|inproc)://.+"
Endpoint = Annotated[str, Meta(pattern=ENDPOINT_PATTERN, max_length=1000)]
"""A ZeroMQ endpoint this project binds or connects: tcp://HOST:PORT, ipc:///path, inproc://."""


PATTERN_HINTS = {
    SENSOR_ID_PATTERN: "letters, digits and _.- (up to 64, starting with a letter or digit)",
    ENDPOINT_PATTERN: "a ZeroMQ endpoint: tcp://HOST:PORT or ipc:///path",
}
"""What each pattern means, said instead of the regex; modules add their own."""


class Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every schema: immutable, keyword-only, unknown keys refused."""


_UNKNOWN = re.compile(r"^Object contains unknown field `(.*)`$")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")


def describe(err: msgspec.MsgspecError, data: Any = None, tp: Any = None) -> str:
    """msgspec's error -> one line ``$.path: [value: ]what was wrong[; allowed ...]``.

    `data`, when given, is the decoded document: the offending value is quoted from it and
    mapping keys are named in the path (msgspec writes ``[...]``). `tp`, when given, is the
    schema: an unknown key or choice is answered with the allowed ones.
    """
    text = " ".join(str(err).split())
    message, sep, path = text.rpartition(" - at `")
    if not sep:
        message, path = text, "$"
    path = path.rstrip("`")
    if path.startswith("key` in `"):  # a mapping key itself is refused
        path, message = path.removeprefix("key` in `"), f"key {message[:1].lower()}{message[1:]}"
    if data is not None and tp is not None:
        path = _name_keys(data, tp, path)
    unknown = _UNKNOWN.match(message)
    if unknown:
        node = _node_at(tp, path) if tp is not None else None
        allowed = [f.encode_name for f in node.fields] \
            if isinstance(node, msgspec.inspect.StructType) else []
        return _printable(f"{path}.{unknown.group(1)}: unknown key" + (
            f"; allowed keys here: {', '.join(allowed)}" if allowed else ""))
    message = message[:1].lower() + message[1:]
    pattern = re.search(r"`str` matching regex '(.*)'$", message)
    if pattern:  # msgspec shows the regex as a repr: doubled backslashes
        hint = PATTERN_HINTS.get(pattern.group(1).replace("\\\\", "\\"))
        message = message if hint is None else f"expected {hint}"
    if message.startswith("invalid enum value") and tp is not None:
        node = _node_at(tp, path)
        if isinstance(node, msgspec.inspect.LiteralType):
            message += f"; choose one of {', '.join(map(str, node.values))}"
    if data is not None:
        found, value = value_at(data, path)
        if isinstance(value, float) and not math.isfinite(value):
            message = f"NaN and infinity are refused; {message}"
        if found and not isinstance(value, dict | list):
            return _printable(f"{path}: {value!r}: {message}")
    return _printable(f"{path}: {message}")


def _printable(line: str) -> str:
    """The line with control characters escaped: a key or value from a document (a key
    holding a newline) must not break the one-line error."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)


def value_at(data: Any, path: str) -> tuple[bool, Any]:
    """(found, value) at a msgspec path like ``$.rules[0].name`` in decoded YAML/JSON."""
    node = data
    for key, index in _STEP.findall(path.removeprefix("$")):
        try:
            node = node[int(index)] if index else node[key]
        except (KeyError, IndexError, TypeError, ValueError):
            return False, None
    return True, node


def _name_keys(data: Any, tp: Any, path: str) -> str:
    """Replace each ``[...]`` (a mapping entry) in `path` by the key whose value is refused."""
    while "[...]" in path:
        head, _, tail = path.partition("[...]")
        found, mapping = value_at(data, head)
        if not found or not isinstance(mapping, dict):
            return path
        for key in mapping:
            try:
                msgspec.convert(_only(data, head, key), tp, dec_hook=_dec_hook)
            except msgspec.ValidationError:
                path = f"{head}.{key}{tail}"
                break
        else:
            return path
    return path


def _only(data: Any, path: str, key: Any) -> Any:
    """A copy of `data` whose mapping at `path` keeps only `key`."""
    steps = [k or int(i) for k, i in _STEP.findall(path.removeprefix("$"))]

    def rebuild(node: Any, rest: list[Any]) -> Any:
        if not rest:
            return {key: node[key]}
        copy = list(node) if isinstance(node, list) else dict(node)
        copy[rest[0]] = rebuild(node[rest[0]], rest[1:])
        return copy

    return rebuild(data, steps)


def _node_at(tp: Any, path: str) -> Any:
    """The msgspec.inspect type found at `path` in schema `tp` (None if the path leaves it)."""
    node: Any = msgspec.inspect.type_info(tp)
    steps = [key or "[]" for key, _ in _STEP.findall(path.removeprefix("$"))]
    for step in [*steps, None]:
        while True:  # look through null-unions and constraints
            if isinstance(node, msgspec.inspect.Metadata):
                node = node.type
            elif isinstance(node, msgspec.inspect.UnionType):
                node = next((t for t in node.types
                             if not isinstance(t, msgspec.inspect.NoneType)), node.types[0])
            else:
                break
        if step is None:
            return node
        if isinstance(node, msgspec.inspect.StructType):
            node = next((f.type for f in node.fields if f.encode_name == step), None)
        elif isinstance(node, msgspec.inspect.DictType):
            node = node.value_type
        elif isinstance(node, msgspec.inspect.ListType | msgspec.inspect.VarTupleType):
            node = node.item_type
        else:
            return None
    return node


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is Path:
        if isinstance(obj, str) and obj:
            return Path(obj).expanduser()
        raise ValueError(f"expected a non-empty path string, got {obj!r}")
    raise NotImplementedError(f"no decoder for {tp}")


def convert(data: Any, tp: type[T], *, error: Callable[[str], Exception]) -> T:
    """Validate decoded YAML (plain dicts and lists) against `tp`; `error(line)` on refusal."""
    try:
        return msgspec.convert(data, tp, dec_hook=_dec_hook)
    except msgspec.ValidationError as err:
        raise error(describe(err, data, tp)) from err


def enc_hook(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


class Refusals:
    """What a receiving loop could not use, counted by reason (``bad_messages``); the first
    ten of each reason, then every thousandth, are logged, so a flood cannot flood the log."""

    def __init__(self, log: logging.Logger, where: str) -> None:
        self.by_reason: Counter[str] = Counter()
        self.last_error: str | None = None
        self._log = log
        self._where = where

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def count(self, reason: str, text: str) -> None:
        self.by_reason[reason] += 1
        self.last_error = text
        n = self.by_reason[reason]
        if n <= 10 or n % 1000 == 0:
            self._log.warning("%s: dropped a bad message (%s, %d so far): %s", self._where,
                              reason, n, text[:300])
