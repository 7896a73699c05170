"""The data config as the data path reads it: its format, its input path, and a plain dataclass to loop with."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llmft.config.data_schema import DataFormat


def format_of(data_cfg) -> DataFormat:
    """data.format, the enum (a str enum: the data path's readers and tables are keyed by it)."""
    return DataFormat(data_cfg.format)


def prepared_manifest_path(folder: Path | str) -> Path:
    """A prepared folder (data.output_dir) is complete when its manifest.json exists (prepared_dir.py writes it last)."""
    return Path(os.path.expandvars(str(folder))).expanduser() / "manifest.json"


def prepared_report_path(folder: Path | str) -> Path:
    """`prepare`'s report.json in a prepared folder: counts, drops, tokens (read by plan and the model card)."""
    return Path(os.path.expandvars(str(folder))).expanduser() / "report.json"


def packs(data_cfg) -> bool:
    """Whether the samples are packed: data.packing, where None (auto) packs; the launch settles auto to false for a
    model that cannot pack (validation.check_packing)."""
    return data_cfg.packing is not False


def data_path(data_cfg) -> Path:
    return Path(os.path.expandvars(str(data_cfg.path))).expanduser()


def plain(data_cfg):
    """The data config as a plain dataclass: OmegaConf's attribute access, in loops over 100k messages, costs more
    than the cleaning itself."""
    return OmegaConf.to_object(data_cfg) if isinstance(data_cfg, DictConfig) else data_cfg
