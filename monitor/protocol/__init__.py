"""The wire: message contract, the schema engine and CURVE keys."""
