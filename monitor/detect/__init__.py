"""Detection: the ONNX event detector and its backbone, the event state machine, per-machine
anomaly scoring and learning.
"""
