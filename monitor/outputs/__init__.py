"""Outputs: results -> wire messages -> every configured output (ZeroMQ with journal and
catch-up, MQTT, Prometheus metrics).
"""
