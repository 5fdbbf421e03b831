"""The event rule of every watched class, in samples: one place that resolves them from
`config.yaml` (per class, then `events.default`), the model card's tuned rules and
thresholds, and the built-in defaults. The daemon, `analyze`, SIGHUP reloads and
`calibrate` all resolve rules here.
"""

from __future__ import annotations

import difflib

from msgspec.structs import replace

from monitor.config import Config, EventRule
from monitor.detect.detector import Detector
from monitor.detect.events import ClassRule
from monitor.errors import ConfigError
from monitor.pipeline.timing import Timing


def resolve_rules(config: Config, detector: Detector, timing: Timing) -> dict[str, ClassRule]:
    """Class rules in samples: config per class, else the card's threshold, else defaults."""
    classes = detector.classes
    for name in config.events.classes:
        if name not in classes:
            close = difflib.get_close_matches(name, classes, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"events.classes.{name}: the model {detector.card.name!r} has no "
                              f"class {name!r}{hint}")
    names = list(config.events.classes)
    if not config.events.only_listed:
        names += [n for n in detector.card.thresholds if n not in config.events.classes]
    default = config.events.default
    rules = {}
    for name in names:
        rule = config.events.classes.get(name, EventRule())
        card = detector.card.rules.get(name, {})

        def pick(key: str, *fallbacks: float | None) -> float:
            """The config's class rule, then the model card's tuned value, then fallbacks."""
            return _first(getattr(rule, key), card.get(key), *fallbacks)  # noqa: B023

        threshold = _first(rule.threshold, detector.card.thresholds.get(name), default.threshold)
        release = min(pick("release", default.release, 0.8 * threshold), threshold)
        confirm_m = int(pick("confirm_m", default.confirm_m))
        confirm_n = min(int(pick("confirm_n", default.confirm_n)), confirm_m)
        ms_to_samples = timing.sample_rate / 1000.0
        rules[name] = ClassRule(
            threshold=threshold, release=release, confirm_n=confirm_n, confirm_m=confirm_m,
            min_duration=round(pick("min_duration_ms", default.min_duration_ms)
                               * ms_to_samples),
            refractory=round(pick("refractory_ms", default.refractory_ms) * ms_to_samples))
    return rules


def _first(*values: float | None) -> float:
    for value in values:
        if value is not None:
            return float(value)
    raise ValueError("no value")


def rule_at(config: Config, detector: Detector, timing: Timing, name: str,
            threshold: float | None) -> ClassRule:
    """The rule the daemon would run for class `name` with `threshold` set in the config
    (None: left out, so the card's threshold)."""
    rule = config.events.classes.get(name, EventRule())
    classes = dict(config.events.classes)
    classes[name] = replace(rule, threshold=threshold)
    changed = replace(config, events=replace(config.events, classes=classes))
    return resolve_rules(changed, detector, timing)[name]
