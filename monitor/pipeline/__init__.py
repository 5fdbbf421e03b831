"""The chain shared by `run` and `analyze`: samples in, typed results out."""
