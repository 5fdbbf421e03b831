"""Property tests over every decoder and config loader: counted and refused, never raised.

Hypothesis generates and mutates input; the property for each decoder is that it returns a
valid value or raises its one documented error (MessageError, ConfigError) with a one-line
message, and never anything else (TypeError, RecursionError, a NaN that gets through).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_messages import samples

from monitor.apps.alert.ack import parse_ack
from monitor.apps.alert.config import load_alert_config
from monitor.apps.proxy import load_proxy_config
from monitor.config import load_config
from monitor.errors import ConfigError, MessageError
from monitor.outputs.catchup import parse_request
from monitor.protocol.messages import decode, encode

REPO = Path(__file__).resolve().parents[1]
VALID = samples()
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Any JSON value, including NaN and infinities as Python's json writes them.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() |
    st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


def one_line(err: BaseException) -> None:
    assert str(err) and "\n" not in str(err)


def check_message(frames: list[bytes]) -> None:
    """The property: a Message that re-encodes (so is valid throughout), or MessageError."""
    try:
        message = decode(frames)
    except MessageError as err:
        one_line(err)
        assert err.reason in {"frames", "too_large", "not_json", "version", "schema", "topic"}
        return
    assert encode(message) == [frames[0], encode(message)[1]]
    for value in msgspec.structs.astuple(message):
        if isinstance(value, float):
            assert math.isfinite(value)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=4))
def test_wire_decoder_on_arbitrary_frames(frames: list[bytes]) -> None:
    check_message(frames)


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_wire_decoder_on_mutated_messages(message: Any, data: st.DataObject) -> None:
    topic, body = encode(message)
    fields = json.loads(body)
    key = data.draw(st.sampled_from([*sorted(fields), "extra"]))
    how = data.draw(st.sampled_from(["replace", "delete", "nest"]))
    if how == "delete":
        fields.pop(key, None)
    elif how == "nest":
        fields[key] = json.loads("[" * 50 + "]" * 50)
    else:
        fields[key] = data.draw(json_values)
    check_message([topic, json.dumps(fields).encode()])


@pytest.mark.parametrize("where", ["body", "label", "top", "mel", "counters"])
def test_deep_nesting_is_refused_not_a_recursion_error(where: str) -> None:
    deep = "[" * 200_000
    if where == "body":
        body = deep
    else:
        body = json.dumps({"v": 1, "type": "event", "sensor_id": "a", "seq": 1, "ts": 1.0,
                           where: "X"}).replace('"X"', deep)
    with pytest.raises(MessageError):
        decode([b"event.x", body.encode()])
    with pytest.raises(MessageError):
        parse_request([body.encode()])
    with pytest.raises(MessageError):
        parse_ack(body.encode())


@pytest.mark.parametrize(("field", "value"), [
    ("label", 123), ("peak_score", "high"), ("seq", "abc"), ("phase", "middle"),
    ("peak_score", float("nan")), ("onset_time", float("inf")), ("seq", -1),
    ("sensor_id", "a b"), ("event_id", ""), ("offset_s", [1.0]),
])
def test_wrong_kinds_of_value_are_refused_with_their_path(field: str, value: Any) -> None:
    """Each of these was accepted, or crashed a subscriber, before the schema."""
    topic, body = encode(VALID[0])
    fields = {**json.loads(body), field: value}
    with pytest.raises(MessageError, match=rf"\$\.{field}|not JSON"):
        decode([topic, json.dumps(fields).encode()])


@FUZZ
@given(st.one_of(st.binary(max_size=200),
                 st.dictionaries(st.sampled_from(["sensor_id", "after_seq", "limit", "x"]),
                                 json_values).map(lambda d: json.dumps(d).encode())))
def test_catchup_request_decoder(payload: bytes) -> None:
    try:
        sensor_id, after_seq, limit = parse_request([payload])
    except MessageError as err:
        one_line(err)
        return
    assert isinstance(sensor_id, str) and after_seq >= 0 and 1 <= limit <= 1000


@FUZZ
@given(st.one_of(st.binary(max_size=200),
                 st.dictionaries(st.sampled_from(["event_id", "by", "x"]),
                                 json_values).map(lambda d: json.dumps(d).encode())))
def test_ack_request_decoder(payload: bytes) -> None:
    try:
        request = parse_ack(payload)
    except MessageError as err:
        one_line(err)
        return
    assert isinstance(request.event_id, str) and request.event_id
    assert isinstance(request.by, str)


def mutate_yaml(data: st.DataObject, document: Any) -> Any:
    """Replace, delete or add one key somewhere in a YAML document."""
    node = document
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys))
        if not isinstance(node[key], dict | list):
            break
        node = node[key]
    if isinstance(node, list) and node:
        node[data.draw(st.integers(0, len(node) - 1))] = data.draw(json_values)
    elif isinstance(node, dict):
        keys = [*sorted(node, key=str), "extra"]
        key = data.draw(st.sampled_from(keys))
        if data.draw(st.booleans()) and key in node:
            del node[key]
        else:
            node[key] = data.draw(json_values)
    return document


LOADERS = {"config.yaml": load_config, "alert.yaml": load_alert_config,
           "fleet.yaml": load_proxy_config}


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_config_loaders_on_mutated_shipped_files(name: str, tmp_path_factory:
                                                 pytest.TempPathFactory) -> None:
    shipped = yaml.safe_load((REPO / name).read_text())
    folder = tmp_path_factory.mktemp("fuzz")
    refused = []

    @FUZZ
    @given(st.data())
    def run(data: st.DataObject) -> None:
        document = mutate_yaml(data, json.loads(json.dumps(shipped)))
        path = folder / name
        path.write_text(yaml.safe_dump(document))
        try:
            LOADERS[name](path)
        except ConfigError as err:
            one_line(err)
            assert str(err).startswith("$") or "config" in str(err), str(err)
            refused.append(err)

    run()
    assert refused, "some mutations must be refused"


@pytest.mark.parametrize("name", sorted(LOADERS))
@FUZZ
@given(text=st.text(max_size=300))
def test_config_loaders_on_arbitrary_text(name: str, text: str,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("text") / name
    path.write_text(text)
    try:
        LOADERS[name](path)
    except ConfigError as err:
        one_line(err)


def test_a_key_holding_a_newline_is_refused_on_one_line(tmp_path: Path) -> None:
    """Found by the fuzz above: the key path of the refusal quoted a mapping key raw, so a
    room named with a newline broke the one-line error."""
    document = yaml.safe_load((REPO / "alert.yaml").read_text(encoding="utf-8"))
    document["rooms"] = {"ward\n3": None}
    path = tmp_path / "alert.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_alert_config(path)
    one_line(refused.value)
    assert "ward\\n3" in str(refused.value)
