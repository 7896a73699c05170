"""python -m llmft.chat run=RUN_DIR [prompt="..."] [KEY=VALUE ...]: talk to a run's fine-tuned model.

    python -m llmft.chat run=RUN_DIR                                  # a conversation in the terminal
    python -m llmft.chat run=RUN_DIR prompt="My job is pending, why?"  # one answer on stdout, then exit

The tokens appear as they are generated. The prompt is rendered with the chat template saved with the run (the one
training used) and the run's data.system_prompt, so the model sees what it was trained on. In a conversation,
/reset forgets it and /exit (or Ctrl-D) quits. Keys: prompt, system (instead of the run's system prompt),
max_new_tokens (512), temperature (0: greedy), top_p, seed, adapter=false (the base model alone, to compare),
base=DIR (the base model's folder, if it moved since training).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Optional

from llmft.config.arguments import UsageError, parse_arguments
from llmft.errors import run_command
from llmft.serve.inference import (
    fit_prompt,
    generation_config,
    input_device,
    is_adapter_run,
    load_run_model,
    load_saved_tokenizer,
    prompt_messages,
    run_config,
    run_directory,
    stop_token_ids,
)

USAGE = 'python -m llmft.chat run=RUN_DIR [prompt="..."] [max_new_tokens=N] [temperature=T] [adapter=false]'


@dataclass
class ChatArgs:
    run: Optional[str] = None
    prompt: Optional[str] = None  # answer this and exit
    system: Optional[str] = None  # None: the run's data.system_prompt, as in training
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    adapter: bool = True  # false: the base model, the adapter disabled
    base: Optional[str] = None  # the base model's folder, if it moved since training


class Chat:
    """A run's model, tokenizer and settings; `answer(messages)` streams one reply to `out` and returns it."""

    def __init__(self, run_dir, args: ChatArgs):
        if not args.adapter and not is_adapter_run(run_dir):
            raise UsageError("adapter=false: this run trained the whole model (peft=full), it has no adapter to "
                             "disable.")
        self.args = args
        self.cfg = run_config(run_dir)
        self.tokenizer = load_saved_tokenizer(run_dir)
        self.model, _ = load_run_model(run_dir, self.cfg, args.base)
        self.stop_ids = stop_token_ids(self.tokenizer, self.cfg.data)
        self.system_prompt = args.system if args.system is not None else self.cfg.data.system_prompt

    def answer(self, messages: list[dict[str, str]], out=None) -> str:
        import torch

        out = out or sys.stdout
        fitted = fit_prompt(self.tokenizer, prompt_messages(messages, self.system_prompt),
                            self.cfg.model.max_seq_len)
        if fitted is None:
            raise UsageError(f"the message is longer than the model's context for this run "
                             f"(model.max_seq_len={self.cfg.model.max_seq_len} tokens).")
        batch = self.tokenizer([fitted[0]], add_special_tokens=False, return_tensors="pt")
        batch = {k: v.to(input_device(self.model)) for k, v in batch.items()}
        streamer = streamer_to(out, self.tokenizer)
        config = generation_config(self.tokenizer, self.stop_ids, self.args.max_new_tokens, self.args.temperature,
                                   self.args.top_p)
        torch.manual_seed(self.args.seed)
        adapter_off = self.model.disable_adapter() if not self.args.adapter else contextlib.nullcontext()
        with adapter_off, torch.no_grad():
            output = self.model.generate(**batch, generation_config=config, streamer=streamer)
        tokens = output[0, batch["input_ids"].shape[1]:].tolist()
        end = next((k + 1 for k, t in enumerate(tokens) if t in self.stop_ids), len(tokens))
        return self.tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()


def streamer_to(out, tokenizer):
    """transformers' TextStreamer (whole words as they complete), writing to any stream rather than stdout."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text)
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def converse(chat: Chat, read=input, out=None) -> None:
    out = out or sys.stdout
    print("Chat with the fine-tuned model" if chat.args.adapter else "Chat with the base model (adapter=false)",
          "- /reset forgets the conversation, /exit or Ctrl-D quits.", file=out)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = []
            print("(conversation forgotten)", file=out)
            continue
        history.append({"role": "user", "content": line})
        out.write("assistant> ")
        out.flush()
        try:
            reply = chat.answer(history, out)
        except KeyboardInterrupt:
            print("\n(interrupted)", file=out)
            history.pop()
            continue
        print(file=out)
        history.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> int:
    return run_command(chat, argv, __doc__)


def chat(argv: list[str]) -> int:
    args = parse_arguments(argv, ChatArgs, USAGE)
    run_dir = run_directory(args.run, USAGE)
    if args.max_new_tokens <= 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError("max_new_tokens must be positive, temperature >= 0 and top_p in (0, 1].")
    session = Chat(run_dir, args)
    if args.prompt is not None:
        session.answer([{"role": "user", "content": args.prompt}])
        print()
    else:
        converse(session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
