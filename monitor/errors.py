"""One error hierarchy; every message is one line naming the bad value and what is allowed."""


class MonitorError(Exception):
    """Base of every error a user can cause; the CLI prints it as one line and exits 2."""


class ConfigError(MonitorError):
    """A config key is unknown, mistyped or out of range."""


class ModelError(MonitorError):
    """A model file or its model card is missing, unreadable or does not match the config."""


class AudioDeviceError(MonitorError):
    """An audio device is missing, busy or cannot be opened with the asked settings."""


class DeviceAbsentError(AudioDeviceError):
    """The input device is not there (yet): a USB microphone that enumerates late. The
    daemon waits for it instead of exiting; not a configuration error."""


class SourceError(MonitorError):
    """An audio source (file, stdin) cannot be read."""


class MessageError(MonitorError):
    """A wire message is malformed or of an unknown schema version.

    `reason` is a short category for counters (``bad_messages`` by reason): frames,
    too_large, not_json, version, schema, topic, refused.
    """

    def __init__(self, message: str, *, reason: str = "schema") -> None:
        super().__init__(message)
        self.reason = reason


def one_line(err: BaseException | str) -> str:
    """An error's text with its line breaks and runs of spaces folded (libsndfile and
    PortAudio messages span lines)."""
    return " ".join(str(err).split())
