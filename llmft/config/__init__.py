"""The configuration layer: the typed schema (`schema.py`, `data_schema.py`), composition of `conf/` with
Hydra (`compose.py`), the one validation step (`validation.py`), `key=value` arguments (`arguments.py`) and the
redaction of secrets (`redact.py`). Every other layer reads it; it imports none of them, and no torch."""
