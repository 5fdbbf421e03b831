"""Capture: audio sources, the PortAudio callback in C and the SPSC ring."""
