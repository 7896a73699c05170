"""What the launcher settles about the data before a run directory exists (login node: no torch here).

Its own module because it uses both prepared_source (a prepared folder's checks) and reading (a strict scan of the
records), and reading itself uses prepared_source in the rank.
"""

from __future__ import annotations

from llmft.config.validation import validate
from llmft.data.prepare.prepared_source import prepared_for_launch
from llmft.data.prepare.reading import scan_records


def data_for_launch(cfg, overrides: list[str]):
    """The run's config with its data settled before the run directory exists: with data.prepared=DIR, DIR's own data
    settings when none are given (else they must agree), its model and inputs checked, and what it holds printed;
    with data.strict=true, the records read once here, so a bad one stops the launch. DataError otherwise."""
    if cfg.data.prepared:
        return prepared_for_launch(cfg, overrides)
    if cfg.data.strict:
        validate(cfg)  # (the scan needs a complete data config; the launcher validates again, as for any run)
        scan_records(cfg.data)
    return cfg
