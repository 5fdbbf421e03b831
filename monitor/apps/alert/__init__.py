"""`audio-monitor alert`: a subscriber that turns events into actions, each exactly once.

Flow: SUB sockets (one per source: a sensor or a proxy) -> `decode` (a malformed or
tampered message is dropped and counted) -> rules -> one SQLite transaction records the
decision and the actions to run (`monitor.apps.alert.outbox`) -> a dispatcher thread runs due
actions (log, webhook, command, publish), retries failures with exponential backoff
until they succeed or expire, and records the outcome.

Nothing is lost: live events are acted on at once; on start-up, on every heartbeat
(`status`) of a sensor, and after a failed catch-up, the daemon asks the source's
catch-up endpoint for the sensor's journaled events after its cursor, so events missed
while this daemon was down, or dropped by ZeroMQ, are judged too. Replays are harmless:
each (rule, sensor, event, phase) is judged once (see `monitor.apps.alert.outbox`).

Modules: `config` (alert.yaml, rules and what firing adds), `daemon` (subscribing,
judging, recording), `dispatch` (running due actions), `catchup`, `ack`, `outbox` (the
exactly-once record), `mqtt_bridge` (MQTT sources).

Threads: the main thread owns the SUB, catch-up and ack sockets and one SQLite
connection; the dispatcher owns the re-publish socket and its own connection; webhook
and command actions run in a small worker pool.
"""
