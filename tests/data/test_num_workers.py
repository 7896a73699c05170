"""data.num_workers: reading, cleaning, scrubbing and tokenizing in worker processes give the same bytes as one
process, for every input format (dedup, PII counts, windows, splits and packing included); training gets the same
samples; a bad record in strict mode is the same one sentence; the key is checked."""

from __future__ import annotations

import csv
import importlib.util
import json
import multiprocessing
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmft.config.compose import SAMPLES_DIR, compose
from llmft.config.validation import check_data
from llmft.data.prepare import one_pass as one_pass_module, reading, tokenizing, workers
from llmft.data.tokenize import rows as rows_module
from llmft.data.tokenize.packing import pack_best_fit
from llmft.data.prepare.reading import read_conversations
from llmft.data.prepare.tokenizing import tokenize_rows
from llmft.data.prepare.one_pass import read_and_tokenize
from llmft.data.prepare.samples_for_run import build_splits
from llmft.data.prepare.prepared_dir import conversations_fingerprint
from llmft.data.prepare.command import prepare
from llmft.data.prepare.prepared_source import FREE_KEYS
from llmft.data.readers.records import DataError
from llmft.data.tokenize.rows import Rows
from llmft.data.tokenize.templating import IGNORE_INDEX, Sample
from llmft.data.tokenize.tokenizer import tokenizer_for_run
from llmft.errors import ConfigError
from support.runs import REPO, run_llmft

STAFF = "data.tickets.staff_domains=[support.example-hpc.fr]"


def synthetic_tickets(seed: int = 7) -> list[dict]:
    """The bundled raw tickets (personal data, HTML, quoted replies, internal notes), plus exact and near duplicates
    under new ids and long tickets with personal data (windowed at max_seq_len=256), shuffled."""
    rng = random.Random(seed)
    base = [json.loads(line) for line in (SAMPLES_DIR / "tickets_sample.jsonl").read_text().splitlines()]
    tickets, number = list(base), 5000
    for ticket in rng.sample(base, 12):  # exported twice
        number += 1
        tickets.append({**ticket, "id": f"T-{number}"})
    for ticket in rng.sample(base, 12):  # one word of the longest message changed
        number += 1
        messages = [dict(m) for m in ticket["messages"]]
        longest = max(messages, key=lambda m: len(m.get("body") or ""))
        words = (longest.get("body") or "").split(" ")
        if len(words) > 40:
            words[len(words) // 2] = "changed"
        longest["body"] = " ".join(words)
        tickets.append({**ticket, "id": f"T-{number}", "messages": messages})
    users = ["Nadia Haddad <nadia.haddad@lab.example.org>", "Paul Girard <p.girard@univ.example.edu>"]
    staff = ["Claire Martin <claire.martin@support.example-hpc.fr>",
             "Julien Lefèvre <julien.lefevre@support.example-hpc.fr>"]
    for index in range(16):
        number += 1
        user, agent = rng.choice(users), rng.choice(staff)
        messages = []
        for turn in range(rng.randint(6, 14)):
            author = agent if turn % 2 else user
            words = " ".join(rng.choice(["job", "node", "quota", "GPU", "scratch", "module", "error", "queue",
                                         "partition", "memory", "walltime", "checkpoint"])
                             for _ in range(rng.randint(20, 90)))
            if turn % 2 == 0 and rng.random() < 0.5:
                words += f" Call me at 06 12 34 {number % 90 + 10:02d} 78 or write to x{number}@lab.example.org, " \
                         f"node 10.1.{index}.7."
            messages.append({"from": author, "date": f"Tue, 07 Jan 2025 10:{turn:02d}:00 +0100",
                             "body": f"Hello,\n\n{words}.\n\nBest regards,\n{author.split(' <')[0]}"})
        tickets.append({"id": f"T-{number}", "subject": f"Long thread {index}", "messages": messages})
    rng.shuffle(tickets)
    return tickets


def write_tickets_jsonl(path: Path, tickets: list[dict]) -> Path:
    """With a byte-order mark, a blank line and bad records (bad JSON line 21, no messages, not UTF-8)."""
    lines = [json.dumps(t, ensure_ascii=False) for t in tickets]
    lines.insert(7, "")
    lines.insert(20, "{not json")
    lines.insert(41, json.dumps({"id": "T-9", "subject": "no messages"}))
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines[:60]) + "\n").encode() + b"\xff\xfe bad bytes\n"
                     + ("\n".join(lines[60:]) + "\n").encode())
    return path


def write_mbox(path: Path, tickets: list[dict]) -> Path:
    spec = importlib.util.spec_from_file_location("make_sample_exports", REPO / "tools" / "make_sample_exports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_mbox(tickets, path)
    return path


def write_csv(path: Path, tickets: list[dict]) -> Path:
    """The first question and answer of each ticket; an id on two rows in three; one row with too few fields."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "subject", "question", "answer"])
        for index, ticket in enumerate(tickets):
            messages = [m for m in ticket["messages"] if not m.get("internal")]
            question = next((m["body"] for m in messages if "support.example-hpc.fr" not in m["from"]), "")
            answer = next((m["body"] for m in messages if "support.example-hpc.fr" in m["from"]), "")
            writer.writerow([ticket["id"] if index % 3 else "", ticket["subject"], question, answer])
            if index == 30:
                handle.write("only,three,fields\n")
    return path


def write_chat_jsonl(path: Path, tickets: list[dict]) -> Path:
    """The bundled clean conversations, then the tickets as raw chat (scrubbing has work to do), one bad role."""
    lines = (SAMPLES_DIR / "tickets_sample.chat.jsonl").read_text().splitlines()
    for index, ticket in enumerate(tickets):
        messages = [{"role": "assistant" if "support.example-hpc.fr" in m["from"] else "user",
                     "content": m.get("body") or ""} for m in ticket["messages"] if not m.get("internal")]
        lines.append(json.dumps({"messages": messages} if index % 4 else {"id": ticket["id"], "messages": messages},
                                ensure_ascii=False))
    lines.insert(50, json.dumps({"messages": [{"role": "robot", "content": "x"}]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


INPUTS = {  # name -> overrides, given a folder to write the input to
    "bundled_sample": lambda tmp: ["data=tickets_sample_jsonl"],
    "bundled_acronyms": lambda tmp: ["data=acronyms_sample"],  # several conversations share an id
    "tickets_jsonl": lambda tmp: [
        "data=tickets", f"data.path={write_tickets_jsonl(tmp / 't.jsonl', synthetic_tickets())}", STAFF,
        "model.max_seq_len=256", "data.test_fraction=0.1"],
    "email": lambda tmp: [
        "data=tickets", "data.format=email", f"data.path={write_mbox(tmp / 't.mbox', synthetic_tickets())}", STAFF,
        "model.max_seq_len=256"],
    "csv": lambda tmp: [
        "data=csv", f"data.path={write_csv(tmp / 't.csv', synthetic_tickets())}", "model.max_seq_len=256",
        "data.csv.question_columns=[subject,question]", "data.csv.id_column=id"],
    "chat_jsonl": lambda tmp: [
        "data=chat_jsonl", f"data.path={write_chat_jsonl(tmp / 'c.jsonl', synthetic_tickets())}",
        "model.max_seq_len=256", "data.packing=false"],
}


@pytest.fixture
def small_chunks(monkeypatch):
    """Cut even these small inputs into many chunks, so that several workers get some and merge in order."""
    monkeypatch.setattr(workers, "MIN_CHUNK_BYTES", 4096)
    monkeypatch.setattr(workers, "MIN_CHUNK_ITEMS", 4)


def spied(function, log: Path):
    """`function`, writing the id of the process that runs it and its TOKENIZERS_PARALLELISM to `log` (the workers
    inherit it through fork)."""
    def run(state, task):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} {os.environ.get('TOKENIZERS_PARALLELISM')}\n")
        return function(state, task)
    return run


def worker_lines(log: Path) -> set[str]:
    """The lines `spied` wrote from processes other than this one."""
    return {line for line in log.read_text().splitlines() if line.split()[0] != str(os.getpid())}


def prepared_files(overrides: list[str], out_dir: Path) -> dict[str, bytes]:
    """Every file of the prepared folder, the manifest as what it says of the samples (samples_part)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    prepare(compose(overrides + [f"data.output_dir={out_dir}"]))
    files = {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}
    files["manifest.json"] = samples_part(files["manifest.json"])
    return files


def samples_part(manifest: bytes) -> bytes:
    """A manifest less what records the command rather than the samples: the command line, the data keys that do
    not change the samples (data.num_workers, data.output_dir...) and the model's entry (its path)."""
    record = json.loads(manifest)
    record.pop("command")
    record.pop("model")
    record["data"] = {key: value for key, value in record["data"].items() if key not in FREE_KEYS}
    return json.dumps(record, indent=2).encode()


@pytest.mark.parametrize("name", INPUTS)
def test_prepare_writes_the_same_bytes_with_any_number_of_workers(name, tmp_path, small_chunks, monkeypatch):
    overrides = INPUTS[name](tmp_path)
    one = prepared_files(overrides + ["data.num_workers=1"], tmp_path / "out")
    report = json.loads(one["report.json"])
    if name == "bundled_acronyms":  # every conversation gives a sample: every one is audited, ids shared or not
        assert not report["samples_dropped"] and report["num_conversations"] == sum(
            one[f].count(b"\n") for f in one if f.endswith(".conversations.jsonl"))
    else:  # the input exercises them
        assert report["pii_replacements"] and report["dropped"].get("exact_duplicate")
    if name not in ("bundled_sample", "bundled_acronyms"):
        assert report["conversations_windowed"] and report["dropped"].get("near_duplicate")
    if name in ("tickets_jsonl", "csv", "chat_jsonl"):
        assert report["num_skipped"]
    log = tmp_path / "pids"
    monkeypatch.setattr(reading, "read_chunk", spied(reading.read_chunk, log))
    monkeypatch.setattr(tokenizing, "tokenize_chunk", spied(tokenizing.tokenize_chunk, log))
    for num_workers in (2, 3) if name == "tickets_jsonl" else (2,):
        log.write_text("")
        files = prepared_files(overrides + [f"data.num_workers={num_workers}"], tmp_path / "out")
        assert sorted(files) == sorted(one)  # dataset arrow files, conversations, report, manifest, histogram
        assert [f for f in one if files[f] != one[f]] == []
        # chunks ran in workers, each forked with one tokenizer thread (the cores are the workers')
        assert worker_lines(log) and {line.split()[1] for line in worker_lines(log)} == {"false"}


def test_training_gets_the_same_samples_with_any_number_of_workers(tmp_path, small_chunks, monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    overrides = INPUTS["tickets_jsonl"](tmp_path)
    cfg = compose(overrides + ["data.num_workers=1"])
    tokenizer = tokenizer_for_run(cfg, read_conversations(cfg.data)[0])
    for packing in ("true", "false"):
        made = []
        for num_workers in (1, 2):
            cfg = compose(overrides + [f"data.num_workers={num_workers}", f"data.packing={packing}"])
            conversations, report = read_conversations(cfg.data)
            made.append((conversations, report, *build_splits(conversations, tokenizer, cfg.data, 256)))
            # the workers are gone once the samples are back, and the environment is the caller's again
            assert not multiprocessing.active_children() and "TOKENIZERS_PARALLELISM" not in os.environ
        assert made[0] == made[1]
        splits = made[0][2]
        assert all(isinstance(s, Sample) for split in splits.values() for s in split)
        assert (splits["train"][0].seq_lengths is not None) == (packing == "true")


def test_a_bad_record_in_strict_mode_is_the_same_sentence_with_workers(tmp_path, small_chunks, monkeypatch):
    path = write_tickets_jsonl(tmp_path / "t.jsonl", synthetic_tickets())
    log = tmp_path / "pids"
    monkeypatch.setattr(reading, "read_chunk", spied(reading.read_chunk, log))
    errors = []
    for num_workers in (1, 2):
        with pytest.raises(DataError) as error:
            read_conversations(compose(["data=tickets", f"data.path={path}", STAFF, "data.strict=true",
                                        f"data.num_workers={num_workers}"]).data)
        errors.append(str(error.value))
    # prepare's one pass (a model's own tokenizer) stops at the same record with the same sentence
    lenient = compose(["data=tickets", f"data.path={path}", STAFF, "data.num_workers=1"])
    tokenizer = tokenizer_for_run(lenient, read_conversations(lenient.data)[0])
    for num_workers in (1, 2):
        with pytest.raises(DataError) as error:
            read_and_tokenize(compose(["data=tickets", f"data.path={path}", STAFF, "data.strict=true",
                                       f"data.num_workers={num_workers}"]).data, tokenizer, 256)
        errors.append(str(error.value))
    assert errors == 4 * [f"{path}:21: bad JSON (Expecting property name enclosed in double quotes) "
                          f"(data.strict=true stops at the first bad record; fix or remove it)."]
    assert worker_lines(log)  # with 2, the bad record was read in a worker


def test_strict_error_from_a_worker_is_one_line_and_forking_does_not_warn(tmp_path):
    """As users run it: default chunk sizes, so the export is large enough for several chunks."""
    tickets = synthetic_tickets()
    tickets = [{**t, "id": f"{t['id']}-{copy}"} for copy in range(6) for t in tickets]  # ~2 MB
    path = write_tickets_jsonl(tmp_path / "t.jsonl", tickets[:500])
    with open(path, "a") as handle:
        handle.write("{not json\n")  # the first bad record the workers meet is the one at line 21
    result = run_llmft("data", "prepare", "data=tickets", f"data.path={path}", STAFF, "data.strict=true",
                       "data.num_workers=2", f"data.output_dir={tmp_path / 'out'}", timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"llmft: {path}:21: bad JSON (Expecting property name enclosed in double quotes) "
        f"(data.strict=true stops at the first bad record; fix or remove it)."]
    result = run_llmft("data", "prepare", "data=tickets", f"data.path={path}", STAFF, "data.num_workers=2",
                       f"data.output_dir={tmp_path / 'out'}", "model.max_seq_len=512", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    # the warning of tokenizers releases before 0.23 when a process forks after using its thread pool: the workers
    # are forked with TOKENIZERS_PARALLELISM=false
    assert "forked" not in result.stderr


def test_num_workers_is_checked_with_one_sentence_naming_the_key(monkeypatch):
    for bad in (0, -2):
        with pytest.raises(ConfigError) as error:
            check_data(compose(["data=tickets_sample_jsonl", f"data.num_workers={bad}"]).data)
        assert str(error.value) == (f"data.num_workers={bad} must be at least 1 (1: all in this process), or null "
                                    f"for the CPUs available (at most 16).")
    cfg = compose(["data=tickets_sample_jsonl"])
    check_data(cfg.data)
    assert cfg.data.num_workers is None
    assert workers.num_workers_of(cfg.data) == min(len(os.sched_getaffinity(0)), 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks of a training job share the node's CPUs
    assert workers.num_workers_of(cfg.data) == max(1, min(len(os.sched_getaffinity(0)) // 2, 16))
    result = run_llmft("data", "prepare", "data=tickets_sample_jsonl", "data.num_workers=0", timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "llmft: data.num_workers=0 must be at least 1 (1: all in this process), or null for the CPUs available "
        "(at most 16)."]


def _die(state, task):
    os._exit(3)


def test_a_worker_that_dies_is_one_sentence_not_a_hang():
    with pytest.raises(DataError, match="a data preparation worker died"):
        list(workers.in_order(_die, None, range(4), 2))


def test_rows_pack_like_pack_best_fit_and_reach_arrow_without_lists(monkeypatch):
    rng = random.Random(0)
    samples = []
    for _ in range(300):
        ids = [rng.randrange(2048) for _ in range(rng.randint(1, 120))]
        samples.append(Sample(ids, [IGNORE_INDEX] + [t if rng.random() < 0.5 else IGNORE_INDEX for t in ids[1:]]))
    rows = Rows.concatenate([Rows(np.array(s.input_ids, np.int32), np.array(s.labels, np.int32),
                                  np.array([len(s.input_ids)])) for s in samples])
    assert rows.samples() == samples
    assert rows.num_supervised == sum(s.num_supervised for s in samples)
    packed = rows.packed(256)
    assert packed.samples() == pack_best_fit(samples, 256)
    monkeypatch.setattr(rows_module, "_MAX_ARROW_LIST_VALUES", 1000)  # int32 offsets overflow: several chunks
    from datasets import Features, Sequence, Value

    schema = Features({name: Sequence(Value("int32")) for name in ("input_ids", "labels", "seq_lengths")}).arrow_schema
    for layout, expected in [(rows, samples), (packed, pack_best_fit(samples, 256))]:
        table = layout.arrow_table(schema)
        assert table.column("input_ids").num_chunks > 1
        assert table.column("input_ids").to_pylist() == [s.input_ids for s in expected]
        assert table.column("labels").to_pylist() == [s.labels for s in expected]
        assert table.column("seq_lengths").to_pylist() == [s.seq_lengths or [len(s.input_ids)] for s in expected]
    assert Rows.empty().arrow_table(schema).num_rows == 0


ONE_PASS_INPUTS = {**INPUTS, "validation_fallback": lambda tmp: [  # no id hashes into validation: one is moved there
    *INPUTS["tickets_jsonl"](tmp), "data.validation_fraction=0.0005"]}


@pytest.mark.parametrize("name", ONE_PASS_INPUTS)
def test_one_pass_gives_what_reading_then_tokenizing_gives(name, tmp_path, small_chunks):
    """read_and_tokenize (a model's own tokenizer: read, clean and tokenize each chunk in one worker pass, duplicates'
    samples dropped after) against read_conversations then tokenize_rows: the same report, samples, counts, audit
    files and conversations fingerprint, on 1 and 3 workers."""
    overrides = ONE_PASS_INPUTS[name](tmp_path)
    cfg = compose(overrides + ["data.num_workers=1"])
    conversations, read_report = read_conversations(cfg.data)
    tokenizer = tokenizer_for_run(cfg, conversations)
    max_seq_len = cfg.model.max_seq_len
    (tmp_path / "two").mkdir()
    two = tokenize_rows(conversations, tokenizer, cfg.data, max_seq_len, audit_dir=tmp_path / "two")
    if name == "validation_fallback":
        assert len({json.loads(line)["id"] for line in
                    (tmp_path / "two" / "validation.conversations.jsonl").read_text().splitlines()}) == 1
    for num_workers in (1, 3):
        out = tmp_path / f"one-{num_workers}"
        out.mkdir()
        report, one, fingerprint = read_and_tokenize(compose(overrides + [f"data.num_workers={num_workers}"]).data,
                                                     tokenizer, max_seq_len, audit_dir=out)
        assert report == read_report and fingerprint == conversations_fingerprint(conversations)
        assert one.counts == two.counts and one.used_ids == two.used_ids
        assert list(one.splits) == list(two.splits)
        for split, rows in one.splits.items():
            for field in ("input_ids", "labels", "sample_lengths", "samples_per_row"):
                assert np.array_equal(getattr(rows, field), getattr(two.splits[split], field)), (split, field)
        assert {split: Path(f).read_bytes() for split, f in one.conversation_files.items()} == \
            {split: Path(f).read_bytes() for split, f in two.conversation_files.items()}
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())


def test_prepare_with_a_model_tokenizer_reads_and_tokenizes_in_one_pass(tmp_path, small_chunks, monkeypatch):
    """prepare with model.path (the tokenizer known before reading): one pass in the workers, the same files as the
    two steps model=tiny takes with that same tokenizer; prepared again, nothing is redone."""
    overrides = INPUTS["tickets_jsonl"](tmp_path)
    two_steps = prepared_files(overrides + ["data.num_workers=2"], tmp_path / "tiny")
    model = tmp_path / "model"
    shutil.copytree(tmp_path / "tiny" / "tokenizer", model)
    log = tmp_path / "pids"
    log.write_text("")
    monkeypatch.setattr(one_pass_module, "prepare_chunk", spied(one_pass_module.prepare_chunk, log))
    monkeypatch.setattr(tokenizing, "tokenize_chunk", spied(tokenizing.tokenize_chunk, log))  # (called by prepare_chunk)
    one_pass = prepared_files(overrides + ["data.num_workers=2", f"model.path={model}"], tmp_path / "one")
    assert worker_lines(log)
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["model"]["path"] == str(model.resolve())
    one_pass["report.json"] = one_pass["report.json"].replace(str(tmp_path / "one").encode(),
                                                              str(tmp_path / "tiny").encode())
    assert {f: b for f, b in one_pass.items() if not f.startswith("tokenizer")} == \
        {f: b for f, b in two_steps.items() if not f.startswith("tokenizer")}
    report = prepare(compose(overrides + ["data.num_workers=2", f"model.path={model}",
                                          f"data.output_dir={tmp_path / 'one'}"]))
    assert report["reused_prepared"] is True


def test_chunks_cover_the_items_in_order_and_shrink_towards_the_end():
    """Guided sizes: the usual chunk while much remains, smaller ones at the end, so the workers finish together."""
    items = list(range(5000))
    cut = workers.chunks(items, 2)
    assert [item for chunk in cut for item in chunk] == items
    sizes = [len(chunk) for chunk in cut]
    assert sizes[0] == workers.MAX_CHUNK_ITEMS and sizes == sorted(sizes, reverse=True)[:-1] + sizes[-1:]
    assert sizes[-2] < sizes[0] and max(sizes[-3:]) <= workers.MIN_CHUNK_ITEMS
