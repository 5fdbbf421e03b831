"""Home Assistant MQTT discovery: the retained config messages that describe a sensor.

Home Assistant reads ``<discovery_prefix>/<component>/<node>/<object>/config`` (retained)
and creates one device per sensor with its entities; their states come from the state
topics the configs name, through ``{{ value_json.<field> }}`` templates.
"""

from __future__ import annotations

from typing import Any

from monitor.config import MqttConfig
from monitor.outputs.composer import Catalog
from monitor.protocol.messages import class_slug

ONLINE, OFFLINE = "online", "offline"
"""Payloads of the availability topic (OFFLINE is also the last will)."""


def discovery_messages(settings: MqttConfig, *, sensor_id: str, base: str, node: str,
                       availability_topic: str, catalog: Catalog,
                       ) -> list[tuple[str, dict[str, Any]]]:
    """(config topic, payload) of every Home Assistant entity of this sensor: one
    `binary_sensor` per event class and per machine fault, `sensor`s for the level, each
    machine's anomaly score and the pipeline state, all under one device `node`. `base`
    is the sensor's topic prefix (``<topic_prefix>/<sensor_id>``)."""
    prefix = settings.discovery_prefix.strip("/")
    device = {"identifiers": [node], "name": f"audio-monitor {sensor_id}",
              "manufacturer": "audio-monitor", "model": catalog.model}
    common = {"availability_topic": availability_topic, "payload_available": ONLINE,
              "payload_not_available": OFFLINE, "device": device}
    messages: list[tuple[str, dict[str, Any]]] = []

    def add(component: str, object_id: str, **entity: Any) -> None:
        unique = f"{node}_{object_id}"
        messages.append((f"{prefix}/{component}/{node}/{object_id}/config",
                         {"unique_id": unique, "object_id": unique, **entity, **common}))

    for label in catalog.classes:
        slug = class_slug(label)
        add("binary_sensor", slug, name=label, device_class="sound",
            state_topic=f"{base}/event/{slug}", json_attributes_topic=f"{base}/event/{slug}",
            value_template="{{ value_json.phase }}", payload_on="start", payload_off="end")
    for machine in catalog.machines:
        slug = class_slug(machine)
        topic = f"{base}/event/machine_fault/{slug}"
        add("binary_sensor", f"{slug}_fault", name=f"{machine} fault", device_class="problem",
            state_topic=topic, json_attributes_topic=topic,
            value_template="{{ value_json.phase }}", payload_on="start", payload_off="end")
        if settings.level_hz > 0:
            add("sensor", f"{slug}_anomaly", name=f"{machine} anomaly score",
                state_topic=f"{base}/anomaly/{slug}", value_template="{{ value_json.score }}",
                state_class="measurement")
    if settings.level_hz > 0:
        add("sensor", "level", name="Level", state_topic=f"{base}/level",
            value_template="{{ value_json.rms_dbfs }}", unit_of_measurement="dBFS",
            state_class="measurement")
    add("sensor", "state", name="State", state_topic=f"{base}/status",
        value_template="{{ value_json.state }}", entity_category="diagnostic")
    add("sensor", "inference", name="Inference time", state_topic=f"{base}/status",
        value_template="{{ value_json.inference_ms_p50 }}", unit_of_measurement="ms",
        state_class="measurement", entity_category="diagnostic")
    return messages
