"""What a prepared folder was made from, and the checks that a run on it trains on exactly that.

`prepare` records in DIR/manifest.json, beside the fingerprint (prepared_dir.py), what the samples were made from:

    data      the data settings, input paths made absolute (`data.prepared=DIR` alone trains with these)
    model     name, path and max_seq_len of the model whose tokenizer made the samples
    command   prepare's overrides, to say how to prepare again
    inputs    each input file's path, size, modification time and SHA-256

At launch, before the run directory exists (`prepared_for_launch`, called by at_launch.data_for_launch), `data.prepared=DIR` alone takes DIR's data settings
(the saved config.yaml records them); data settings given with it must agree with them, and so must the model and
its max_seq_len; the input files must be those DIR was made from. Each refusal is one sentence with the command that
prepares again. A rank then loads DIR's samples and tokenizer and never reads the input (`read_conversations`,
`build_splits`): it checks the files' sizes and times only, hashing a file only where they changed (a copy, a touch).
This module imports neither torch nor transformers: the launcher runs it on the login node.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llmft.config.data_schema import DataConfig, DataFormat
from llmft.data.prepare.data_config import packs, prepared_manifest_path, prepared_report_path
from llmft.data.readers.records import DataError, input_files, skipped_lines
from llmft.data.readers.transcripts import TRANSCRIPT_SUFFIXES

# Data keys that do not change the samples: a run may set them as it likes on a prepared folder.
FREE_KEYS = ("name", "prepared", "output_dir", "num_workers", "strict")
INPUT_SUFFIXES = {  # the files each format reads in a folder (its reader's own list)
    DataFormat.chat_jsonl: (".jsonl", ".json"), DataFormat.tickets_jsonl: (".jsonl", ".json"),
    DataFormat.preference_jsonl: (".jsonl", ".json"), DataFormat.kto_jsonl: (".jsonl", ".json"),
    DataFormat.email: (".eml", ".mbox", ".mbx"), DataFormat.csv: (".csv", ".tsv"),
    DataFormat.acronyms: (".json", ".jsonl"), DataFormat.transcript: TRANSCRIPT_SUFFIXES,
}
NOT_SET = "???"


# ------------------------------------------------------------------------------------------------ the record

def absolute(path: str) -> str:
    return str(Path(os.path.expandvars(str(path))).expanduser().resolve())


def settings_of(data_cfg) -> dict:
    """The data settings as plain values (enums by name), input paths absolute."""
    node = data_cfg if isinstance(data_cfg, DictConfig) else OmegaConf.structured(data_cfg)
    settings = OmegaConf.to_container(node, resolve=True, enum_to_str=True, throw_on_missing=False)
    for part in [settings, *(settings.get("sources") or [])]:
        if part.get("path") not in (None, NOT_SET):
            part["path"] = absolute(part["path"])
    return settings


def input_paths(data_cfg) -> list[Path]:
    """The files the data settings read: each source's, for a mixture."""
    parts = data_cfg.sources if DataFormat(data_cfg.format) is DataFormat.mixture else [data_cfg]
    files: list[Path] = []
    for part in parts:
        files += input_files(Path(absolute(part.path)), INPUT_SUFFIXES[DataFormat(part.format)])
    return files


def content_hash(file: Path) -> str | None:
    try:
        with open(file, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:  # unreadable: its reader reports it; the size and time still tell a change
        return None


def input_fingerprint(data_cfg) -> list[dict]:
    """Each input file's path, size, modification time (ns) and content hash."""
    found = []
    for file in input_paths(data_cfg):
        try:
            stat = file.stat()
        except OSError:
            found.append({"path": str(file), "size": None, "mtime_ns": None, "sha256": None})
            continue
        found.append({"path": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                      "sha256": content_hash(file)})
    return found


def manifest_record(cfg, overrides: list[str] | None) -> dict:
    """What `prepare` records of its inputs (taken before it reads them, so a file changed meanwhile shows later)."""
    data = {**settings_of(cfg.data), "packing": packs(cfg.data)}  # (auto: as it applied)
    return {"data": data,
            "model": {"name": cfg.model.name, "path": absolute(cfg.model.path) if cfg.model.path else None,
                      "max_seq_len": cfg.model.max_seq_len},
            "command": list(overrides) if overrides is not None else None,
            "inputs": input_fingerprint(cfg.data)}


def same_record(recorded: dict, record: dict) -> bool:
    """Whether a manifest's record is this one (its command aside, which may spell the same settings otherwise)."""
    return first_difference(record["data"], recorded.get("data") or {}) is None and \
        recorded.get("model") == record["model"] and recorded.get("inputs") == record["inputs"]


# ------------------------------------------------------------------------------------------------ the checks

def read_manifest(prepared_dir: Path, key: str = "data.prepared") -> dict:
    """DIR's manifest, with its record of what it was made from; DataError in one sentence otherwise."""
    path = prepared_manifest_path(prepared_dir)
    if not path.is_file():
        raise DataError(f"{key}={prepared_dir} holds no prepared dataset (no {path.name}): prepare it first, "
                        f"`python -m llmft.data prepare data=... data.output_dir={prepared_dir}`, or point {key} at "
                        f"the folder that prepare wrote.")
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        manifest = {}  # (a manifest is written whole, then renamed: this one is not llmft's)
    if "inputs" not in manifest or "data" not in manifest:
        raise DataError(f"{key}={prepared_dir} was prepared by an earlier llmft, whose manifest does not say what it "
                        f"was made from: prepare it again (`python -m llmft.data prepare` with the same settings and "
                        f"data.output_dir={prepared_dir}).")
    return manifest


def flat(value, prefix: str) -> dict:
    """Dotted keys to leaf values; a list of dicts (mixture sources) by index, other lists whole."""
    if isinstance(value, dict):
        found = {}
        for key, item in value.items():
            found.update(flat(item, f"{prefix}.{key}"))
        return found
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        found = {}
        for index, item in enumerate(value):
            found.update(flat(item, f"{prefix}[{index}]"))
        return found
    return {prefix: value}


def first_difference(given: dict, recorded: dict) -> tuple[str, object, object] | None:
    """The first data key (schema order) whose value differs, with the value given and the value recorded; keys
    that do not change the samples aside, and packing left to auto (None) agrees with what it settled to."""
    recorded = settings_of(OmegaConf.merge(OmegaConf.structured(DataConfig), recorded)) if recorded else {}
    given, recorded = flat(given, "data"), flat(recorded, "data")
    for key in dict.fromkeys([*recorded, *given]):
        name = key.rsplit(".", 1)[-1]
        if name in FREE_KEYS and (key.count(".") == 1 or name != "name"):  # a source's name prefixes its ids
            continue
        value, wanted = given.get(key), recorded.get(key)
        if value != wanted and not (key == "data.packing" and value is None):
            return key, value, wanted
    return None


def shown(value) -> str:
    if value == NOT_SET:
        return "(not set)"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def prepare_command(manifest: dict, prepared_dir, replace: list[str] = (), output_dir: str | None = None) -> str:
    """`python -m llmft.data prepare ...` that makes DIR again, with `replace` overrides instead of prepare's own
    of the same keys (model=..., data settings), into `output_dir` (DIR by default)."""
    command = manifest.get("command")
    if command is None:  # prepared from Python: its settings, as keys
        data = manifest["data"]
        command = [f"data={data.get('name')}", f"data.format={data.get('format')}", f"data.path={data.get('path')}"]
    if any(o.split("=", 1)[0].lstrip("+~") == "data" for o in replace):  # another data group: prepare's data aside
        command = [o for o in command if not _key(o).startswith("data")]
    keys = {_key(o) for o in replace}
    kept = [o for o in command if _key(o) not in keys and _key(o) != "data.output_dir"
            and not (_key(o) == "model" and any(k.startswith("model") for k in keys))]
    out = output_dir or str(prepared_dir)
    return "python -m llmft.data prepare " + " ".join(shlex.quote(o) for o in [*kept, *replace,
                                                                                f"data.output_dir={out}"])


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def data_overrides(overrides: list[str]) -> list[str]:
    """The overrides that choose or change data settings (`data=`, `data.path=`, ...), not the keys a run may set
    freely on a prepared folder (data.prepared, data.strict, data.num_workers, data.output_dir)."""
    return [o for o in overrides if _key(o) == "data" or
            (_key(o).startswith("data.") and _key(o).split(".")[1].split("[")[0] not in FREE_KEYS)]


def model_overrides(overrides: list[str]) -> list[str]:
    return [o for o in overrides if _key(o) == "model" or _key(o).startswith("model.")]


def check_model(cfg, manifest: dict, prepared_dir: Path, overrides: list[str]) -> None:
    """The tokenizer and sequence length DIR's samples were made with are the run's."""
    recorded = manifest["model"]
    path = absolute(cfg.model.path) if cfg.model.path else None
    if path != recorded["path"] or (path is None and cfg.model.name != recorded["name"]):
        ours = f"model={cfg.model.name}" + (f" ({path})" if path else "")
        theirs = f"model={recorded['name']}" + (f" ({recorded['path']})" if recorded["path"] else "")
        again = prepare_command(manifest, prepared_dir, model_overrides(overrides) or [f"model={cfg.model.name}"],
                                "NEW_DIR")
        raise DataError(f"data.prepared={prepared_dir} was tokenized for {theirs}, not for this run's {ours}: prepare "
                        f"the data for this model (`{again}`) and train with data.prepared=NEW_DIR, or train with "
                        f"{theirs.split(' ')[0]}.")
    if cfg.model.max_seq_len != recorded["max_seq_len"]:
        again = prepare_command(manifest, prepared_dir, [f"model.max_seq_len={cfg.model.max_seq_len}"], "NEW_DIR")
        raise DataError(
            f"data.prepared={prepared_dir} was cut and packed for model.max_seq_len={recorded['max_seq_len']}, not "
            f"this run's {cfg.model.max_seq_len}: leave model.max_seq_len at {recorded['max_seq_len']}, or prepare "
            f"again (`{again}`) and train with data.prepared=NEW_DIR.")


def check_settings(data_cfg, manifest: dict, prepared_dir: Path, given: list[str] = ()) -> None:
    """The run's data settings are those DIR was prepared with."""
    difference = first_difference(settings_of(data_cfg), manifest["data"])
    if difference is None:
        return
    key, value, wanted = difference
    again = f"`{prepare_command(manifest, prepared_dir, list(given), 'NEW_DIR')}`" if given else \
        "`python -m llmft.data prepare` with these settings and data.output_dir=NEW_DIR"
    raise DataError(f"data.prepared={prepared_dir} was prepared with {key}={shown(wanted)}, but this run has "
                    f"{key}={shown(value)}: leave the data settings out to train on {prepared_dir} as it was prepared, "
                    f"or prepare these settings into a folder of their own ({again}) and train with "
                    f"data.prepared=NEW_DIR.")


def changed_input(manifest: dict, data_cfg) -> str | None:
    """Which input file changed since DIR was prepared, as a clause; None when none did. A file whose size and time
    are as recorded is unchanged; one whose size or time changed is hashed (a copy, a touch: the same content)."""
    recorded = {entry["path"]: entry for entry in manifest["inputs"]}
    try:
        files = input_paths(data_cfg)
    except DataError as error:  # data.path is gone, or holds no file of its format any more
        return str(error).rstrip(".")
    for file in files:
        entry = recorded.pop(str(file), None)
        if entry is None:
            return f"{file} was added since"
        try:
            stat = file.stat()
        except OSError as error:
            return f"{file} cannot be read ({error.strerror or error})"
        if (stat.st_size, stat.st_mtime_ns) == (entry["size"], entry["mtime_ns"]):
            continue
        if stat.st_size != entry["size"]:
            return f"{file} changed since ({entry['size']} bytes then, {stat.st_size} now)"
        if content_hash(file) != entry["sha256"]:
            return f"{file} changed since (same size, other content)"
    if recorded:
        return f"{next(iter(recorded))} is gone since"
    return None


def check_inputs(data_cfg, manifest: dict, prepared_dir: Path) -> None:
    change = changed_input(manifest, data_cfg)
    if change is not None:
        raise DataError(f"data.prepared={prepared_dir} was made from other input files than today's ({change}): "
                        f"prepare it again (`{prepare_command(manifest, prepared_dir)}`), or restore the files it was "
                        f"made from.")


def check_strict(data_cfg, report: dict, prepared_dir: Path) -> None:
    """data.strict=true on a folder prepared without it: its bad records stop the run as reading them would."""
    if data_cfg.strict and report.get("num_skipped"):
        raise DataError(f"{report['skipped'][0]} (data.strict=true, and data.prepared={prepared_dir} skipped "
                        f"{report['num_skipped']} bad record(s) when it was prepared: fix them and prepare again, or "
                        f"leave data.strict out).")


def read_report(prepared_dir: Path) -> dict:
    path = prepared_report_path(prepared_dir)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise DataError(f"data.prepared={prepared_dir} has no readable {path.name}: prepare it again.") from None


# ------------------------------------------------------------------------------------------------ at launch

def prepared_dir_of(data_cfg) -> Path:
    return Path(absolute(data_cfg.prepared))


def prepared_for_launch(cfg, overrides: list[str]):
    prepared_dir = prepared_dir_of(cfg.data)
    manifest = read_manifest(prepared_dir)
    given = data_overrides(overrides)
    taken = not given
    if taken:  # data.prepared=DIR alone: DIR's own settings, with what the run may set freely
        try:
            data = OmegaConf.merge(OmegaConf.structured(DataConfig), manifest["data"])
        except Exception as error:  # a key this llmft does not know any more
            raise DataError(f"data.prepared={prepared_dir} holds data settings this llmft cannot read "
                            f"({str(error).splitlines()[0]}): prepare it again "
                            f"(`{prepare_command(manifest, prepared_dir)}`).") from None
        data.prepared, data.output_dir = str(prepared_dir), str(prepared_dir)
        data.strict, data.num_workers = cfg.data.strict, cfg.data.num_workers
        cfg.data = data
    check_settings(cfg.data, manifest, prepared_dir, given)
    check_model(cfg, manifest, prepared_dir, overrides)
    check_inputs(cfg.data, manifest, prepared_dir)
    report = read_report(prepared_dir)
    check_strict(cfg.data, report, prepared_dir)
    # the bad records too where the rank's output goes to a job's log (a local rank prints them as it starts)
    lines = prepared_lines(cfg.data, report, prepared_dir, taken, getattr(cfg, "cluster", None) is not None)
    print("llmft: " + "\n".join(lines), file=sys.stderr)
    return cfg


def prepared_lines(data_cfg, report: dict, prepared_dir: Path, taken: bool, with_skipped: bool) -> list[str]:
    """What a run on DIR trains on, for the console: where it came from, how much, and its bad records."""
    settings = f"its own data settings: data={data_cfg.name}, " if taken else ""
    samples = report.get("samples", {})
    rows = report.get("packed_rows")
    counted = ", ".join(f"{n} {split}" for split, n in samples.items())
    lines = [f"data.prepared={prepared_dir}: {settings}{report.get('format')} from {report.get('path')}, "
             f"{report.get('num_conversations')} conversations kept of {report.get('records_read')} records; samples "
             f"{counted}" + (f" (packed into {rows.get('train')} train rows)" if rows else "")]
    return lines + (skipped_lines(report.get("skipped", []), report.get("num_skipped")) if with_skipped else [])


# ------------------------------------------------------------------------------------------------ in the rank

class PreparedConversations(Sequence):
    """The conversations of a run on a prepared folder, as `read_conversations` gives them: their number from DIR's
    report; the conversations themselves are read from data.path only if something goes through them (evaluation's
    held-out split). Training takes DIR's samples and tokenizer (`build_splits`, `tokenizer_for_run`) and never
    does."""

    def __init__(self, data_cfg, prepared_dir: Path, num_conversations: int, read_input):
        self.data_cfg, self.prepared_dir, self.num_conversations = data_cfg, prepared_dir, num_conversations
        self.read_input = read_input  # reading.read_input, given by its caller (reading imports this module)
        self._read: list | None = None

    def conversations(self) -> list:
        if self._read is None:
            self._read, _ = self.read_input(self.data_cfg)
        return self._read

    def __len__(self) -> int:
        return self.num_conversations if self._read is None else len(self._read)

    def __getitem__(self, index):
        return self.conversations()[index]

    def __iter__(self):
        return iter(self.conversations())


def prepared_conversations(data_cfg, read_input) -> tuple[PreparedConversations, dict]:
    """`read_conversations` on data.prepared=DIR: the conversations (read by `read_input` only if asked) and DIR's read
    report."""
    prepared_dir = prepared_dir_of(data_cfg)
    read_manifest(prepared_dir)
    report = read_report(prepared_dir)
    check_strict(data_cfg, report, prepared_dir)
    kept = {key: value for key, value in report.items()
            if key not in ("files", "fingerprint", "reused_prepared", "output_dir")}
    return PreparedConversations(data_cfg, prepared_dir, int(report.get("num_conversations") or 0), read_input), kept


def prepared_samples(tokenizer, data_cfg, max_seq_len: int):
    """`build_splits` on data.prepared=DIR: DIR's samples when the run's settings, input files, tokenizer and sequence
    length are those it was made with; DataError in one sentence otherwise (never another data set instead)."""
    from llmft.data.prepare.mixture import with_mixture_settings
    from llmft.data.prepare.prepared_dir import load_samples, settings_fingerprint, tokenizer_fingerprint
    from llmft.data.prepare.tokenizing import end_of_turn_of

    prepared_dir = prepared_dir_of(data_cfg)
    manifest = read_manifest(prepared_dir)
    check_settings(data_cfg, manifest, prepared_dir)
    check_inputs(data_cfg, manifest, prepared_dir)
    end_of_turn, _ = end_of_turn_of(tokenizer, data_cfg)
    parts = with_mixture_settings({"conversations": manifest["fingerprint"]["conversations"],
                                   "tokenizer": tokenizer_fingerprint(tokenizer, end_of_turn),
                                   "settings": settings_fingerprint(data_cfg, max_seq_len)}, data_cfg)
    loaded = load_samples(prepared_dir, parts)
    if isinstance(loaded, str):
        raise DataError(f"{loaded} than this run's (the model's tokenizer, model.max_seq_len or a data setting): train "
                        f"with the model and settings it was prepared with, or prepare it again "
                        f"(`{prepare_command(manifest, prepared_dir)}` with this run's model).")
    splits, counts = loaded
    return splits, {**counts, "prepared_dir": str(prepared_dir), "reused_prepared": True, "fingerprint": parts}
