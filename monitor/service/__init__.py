"""The live daemon: its loop, health watchdog, systemd notification and units."""
