"""audio-monitor: a real-time streaming audio event monitor."""

__version__ = "0.1.0"
