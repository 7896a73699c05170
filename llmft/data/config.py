"""The schema of the `data=` group (conf/data/*.yaml). No torch here: the launcher imports it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

from omegaconf import MISSING


class DataFormat(str, Enum):
    chat_jsonl = "chat_jsonl"
    tickets_jsonl = "tickets_jsonl"
    email = "email"
    csv = "csv"
    acronyms = "acronyms"


@dataclass
class DataConfig:
    name: str = MISSING
    path: str = MISSING  # a file or a folder
    format: DataFormat = DataFormat.chat_jsonl
    system_prompt: Optional[str] = None  # prepended to conversations that have no system message
    validation_fraction: float = 0.1  # share of conversations (by id hash) held out for validation
    strict: bool = False  # stop at the first malformed record instead of skipping and counting it
