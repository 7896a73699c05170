"""python -m llmft.train: train from a run directory (one process per rank) (the work is in llmft.training.loop).

Its first instructions, before torch is imported (seconds): a rank under torchrun whose launcher is already gone
ends, and one whose torchrun dies from now on is ended by the kernel (llmft/rundir/lifetime.py); the stop signals are
recorded from here on (llmft/training/signals.py), so a SIGUSR2 or SIGTERM during the imports, the data or the model
loading stops the run cleanly instead of killing it."""

from llmft.errors import closed_pipe_ends_quietly
from llmft.rundir.lifetime import die_with_launcher, end_rank
from llmft.training.signals import recording

if __name__ == "__main__":
    die_with_launcher()
    with recording():
        from llmft.training.loop import main

        code = closed_pipe_ends_quietly(main)  # `--help | head` ends quietly
    end_rank(code)  # without the interpreter's teardown (llmft/rundir/lifetime.py says why)
