"""Training of the event head on top of YAMNet embeddings (set-up time only, never at run time).

dataset: clips, splits and augmentation; features: log-mel windows and cached embeddings;
train: multiple-instance head training and the model card; compose: the ONNX graphs;
evaluate: held-out metrics through the live chain and the report.
"""
