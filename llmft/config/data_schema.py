"""The schema of the `data=` group (conf/data/*.yaml). No torch here: the launcher imports it.

Every key has a default that suits an HPC support team's ticket export; a format only reads its own sub-group
(`tickets`, `email`, `csv`, `acronyms`). `python -m llmft.data prepare --cfg job` prints the resolved values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from omegaconf import MISSING


class DataFormat(str, Enum):
    chat_jsonl = "chat_jsonl"  # {"messages": [{"role", "content"}]} one a line
    tickets_jsonl = "tickets_jsonl"  # {"id", "subject", "messages": [{"from", "date", "body"}]} one a line
    email = "email"  # an mbox file, or a folder of .eml files (and mbox files)
    csv = "csv"  # one question/answer pair a row
    acronyms = "acronyms"  # a JSON list of {"acronym", "definition"}, turned into synthetic conversations
    # DPO pairs (TRL's conversational preference format), one a line: {"id"?, "prompt", "chosen", "rejected"}
    preference_jsonl = "preference_jsonl"
    kto_jsonl = "kto_jsonl"  # KTO examples, one a line: {"id"?, "prompt", "completion", "label": true|false}
    transcript = "transcript"  # text or Markdown: `## Ticket #12` headings, then `Speaker : text` turns
    mixture = "mixture"  # `data.sources`: several data configs, each drawn at its `weight` share of training


class AcronymSplit(str, Enum):
    # every conversation of an acronym in one split, by a hash of it: does the model explain acronyms it never saw?
    by_acronym = "by_acronym"
    # every acronym trained, other phrasings of its question held out: does the model remember what it was taught?
    by_phrasing = "by_phrasing"


class LongConversations(str, Enum):
    window = "window"  # cut into windows of whole exchanges (user turn + assistant reply) that fit
    drop = "drop"  # drop the conversation, counted in the report


@dataclass
class TicketsConfig:
    """Who is staff (assistant turns) in `tickets_jsonl` and `email`: anyone else is a user."""

    # Author e-mail domains of the support team; subdomains match too (`example.fr` matches `hpc.example.fr`).
    staff_domains: list[str] = field(default_factory=list)
    # Individual staff members: e-mail addresses or display names (case-insensitive).
    staff_addresses: list[str] = field(default_factory=list)
    # tickets_jsonl: a message whose field of this name is true is an internal note, dropped (never trained on).
    internal_field: str = "internal"
    # Put the ticket subject on the first line of the first user turn: it often holds the question.
    include_subject: bool = True


@dataclass
class EmailConfig:
    # A ticket id in the subject groups mails into one ticket even without References / In-Reply-To headers.
    # One capturing group: the id. Matches `[Ticket #1234]`, `[Ticket#1234]`, `[Case #1234]`, `[Demande #1234]`.
    ticket_id_pattern: str = r"\[\s*(?:Ticket|Case|Demande|Request|Incident)\s*#?\s*(\d+)\s*\]"


@dataclass
class CsvConfig:
    # Columns joined (blank line between them) into the user turn, for example [subject, body].
    question_columns: list[str] = field(default_factory=lambda: ["question"])
    answer_column: str = "answer"
    id_column: Optional[str] = None  # None: the id is a hash of the row's text, stable when rows are added
    delimiter: str = ","


@dataclass
class AcronymsConfig:
    conversations_per_acronym: int = 4  # distinct synthetic conversations generated for each acronym
    # What is held out. A glossary entry with "control": true is never trained, whatever the split: its questions
    # are held out, to show what the model guesses unaided.
    split: AcronymSplit = AcronymSplit.by_acronym
    # by_phrasing: questions held out per taught acronym (single exchanges, in phrasings training does not use for it)
    held_out_phrasings: int = 2
    # Optional: an OpenAI-compatible endpoint writes the conversations instead of the templates. Never required:
    # when it fails, the templates are used and the report counts the failures.
    llm_url: Optional[str] = None  # base URL, e.g. http://localhost:8000/v1 (POST {llm_url}/chat/completions)
    llm_model: Optional[str] = None
    llm_api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key (never the key)
    llm_timeout_s: float = 60.0


@dataclass
class TranscriptConfig:
    """`data.format=transcript`: how tickets and turns are recognised in the text or Markdown files."""

    # A line that starts a ticket, searched case-insensitively at the start of each line; its one capturing group
    # is the ticket id (the split is a hash of it), the rest of the line the subject. The default matches
    # `## Ticket #12`, `Ticket 12`, `# Ticket n°12 - subject`, `**Ticket #12**`, `Demande T-12 : subject`,
    # `Ticket #2024-0012` (an id starts with a digit, or letters and a digit; a line such as "Ticket closed" is text).
    ticket_pattern: str = (r"^[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*)?[ \t]*(?:Ticket|Demande|Case|Request)[ \t]*"
                           r"(?:n[°o]\.?|#|no\.|num[ée]ro|number)?[ \t]*([A-Za-z]*-?\d[\w-]*)")
    # Speaker (case-insensitive) -> role: user, assistant, or drop (turns that never reach the model, such as
    # internal notes). A ticket with a speaker not listed here is skipped and reported as file:line.
    roles: dict[str, str] = field(
        default_factory=lambda: {
            "Utilisateur": "user", "User": "user", "Client": "user",
            "IDRIS": "assistant", "Support": "assistant", "Assistance": "assistant",
            "Note interne": "drop", "Internal note": "drop",
        }
    )


@dataclass
class CleanConfig:
    # Quoted replies (`>` lines, `On ... wrote:` / `Le ... a écrit :` and what follows, forwarded headers) and
    # signatures. None: on for tickets_jsonl, email and csv; off for chat_jsonl and acronyms (already clean text,
    # where a `>` line may be a Markdown quote).
    strip_quotes: Optional[bool] = None
    strip_signatures: Optional[bool] = None
    # A line near the end that starts with one of these starts the signature: it and what follows are dropped.
    closings: list[str] = field(
        default_factory=lambda: [
            "Best regards", "Kind regards", "Regards", "Best wishes", "Best", "Cheers", "Thanks", "Thank you",
            "Many thanks", "Thanks in advance", "Sincerely", "Yours",
            "Cordialement", "Bien cordialement", "Très cordialement", "Bien à vous", "Salutations",
            "Meilleures salutations", "Merci", "Merci d'avance", "Merci beaucoup", "Bonne journée", "Bonne soirée",
            "Mit freundlichen Grüßen", "Viele Grüße", "Saludos", "Cordiali saluti",
        ]
    )
    min_assistant_chars: int = 20  # a conversation whose assistant text is shorter teaches nothing: dropped
    # A longer user message (pasted logs) keeps its first `max_message_chars` characters; a longer assistant
    # message drops the conversation (a truncated answer would teach the model to stop mid-sentence).
    max_message_chars: int = 12000
    # Conversations more similar than this (MinHash estimate of the Jaccard similarity of word 5-grams) to an
    # earlier one are dropped as near duplicates. Exact duplicates are always dropped. 1.0: exact only.
    near_duplicate_threshold: float = 0.9


@dataclass
class ScrubConfig:
    """Personal data and secrets replaced by typed placeholders (<EMAIL>, <PHONE>, <IP>, <URL>, <SECRET>, ...)."""

    enabled: bool = True
    # tickets_jsonl / email: the names in the From headers of a ticket are replaced by <NAME> in that ticket.
    names_from_headers: bool = True
    # Site-specific patterns: placeholder name -> regular expression. A match becomes <NAME_OF_THE_KEY>.
    # The defaults fit IDRIS Jean Zay: logins like abc12de, project ids like gen1234 and accounts like abc@h100,
    # home directories (/home/jdupont/x -> <HOME>/x).
    patterns: dict[str, str] = field(
        default_factory=lambda: {
            "LOGIN": r"\b[a-z]{3}\d{2}[a-z]{2,3}\b",
            "PROJECT": r"\bgen\d{4,5}\b|\b[a-z]{3}@(?:v100|a100|h100|cpu)\b",
            "HOME": r"/(?:home|Users)/[A-Za-z0-9._-]+",
        }
    )
    keep_ips: list[str] = field(default_factory=lambda: ["0.0.0.0", "127.0.0.1", "::1"])  # not personal data
    # The names a text writes as names are replaced by <NAME> too, in every format (CSV and chat JSONL have no
    # authors): after a greeting ("Bonjour Marie,", "Dear Dr Dupont,"), in a signature ("Cordialement,\nMarie
    # Curie", "-- \nMarie Curie"), in a reply header ("Marie Curie <...> a écrit :") or a quoted "From:" line.
    names_in_text: bool = True
    # Words and phrases that no pattern replaces, a name or anything else (case-sensitive, whole words): the site's
    # own names, which a participant's first name or an organisation's display name would otherwise hide.
    keep: list[str] = field(default_factory=lambda: ["Jean Zay", "Jean-Zay", "IDRIS", "GENCI", "CNRS"])


@dataclass
class DataConfig:
    name: str = MISSING
    path: str = MISSING  # a file or a folder
    format: DataFormat = DataFormat.chat_jsonl
    system_prompt: Optional[str] = None  # prepended to conversations that have no system message
    # Split by a hash of the ticket id: deterministic, no ticket in two splits, adding tickets never moves old ones.
    validation_fraction: float = 0.1
    test_fraction: float = 0.0  # > 0 adds a `test` split, held out from training and validation
    strict: bool = False  # stop at the first malformed record (read at launch: before a run directory exists)
    tickets: TicketsConfig = field(default_factory=TicketsConfig)
    email: EmailConfig = field(default_factory=EmailConfig)
    csv: CsvConfig = field(default_factory=CsvConfig)
    acronyms: AcronymsConfig = field(default_factory=AcronymsConfig)
    transcript: TranscriptConfig = field(default_factory=TranscriptConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    scrub: ScrubConfig = field(default_factory=ScrubConfig)
    # Pack samples into rows of model.max_seq_len tokens (best fit), attention never crossing samples. None (auto):
    # pack, unless the model cannot tell packed samples apart (BLOOM's ALiBi has no position ids): then unpacked, said
    # in one line at launch. true on such a model is refused.
    packing: Optional[bool] = None
    long_conversations: LongConversations = LongConversations.window  # longer than model.max_seq_len
    # The token that closes an assistant turn in the chat template, supervised so the model learns to stop.
    # None: the tokenizer's eos_token (right for ChatML, Llama 3 Instruct, Mistral, Qwen; Gemma needs <end_of_turn>).
    end_of_turn_token: Optional[str] = None
    # `python -m llmft.data prepare` writes the tokenized dataset, report.json, the length histogram and the
    # audited conversations here.
    output_dir: Optional[str] = None
    # A folder written by `prepare`: training takes its samples and tokenizer as they are, never re-reading the input.
    # Given alone, the run takes DIR's own data settings (its manifest.json); data settings given with it must agree
    # with them, the model's tokenizer and max_seq_len too, and the input files must be unchanged since (their size,
    # time and content hash): otherwise the launch is refused, saying which. None: `output_dir` is reused when its
    # fingerprint (conversations, tokenizer, settings) matches; otherwise training tokenizes in memory and says why.
    prepared: Optional[str] = None
    # Processes that read, clean, scrub and tokenize (chunks of tickets; the outputs are the same for any number).
    # None: the CPUs this process may use (os.sched_getaffinity: SLURM's binding counts), at most 16, shared by the
    # ranks of a training job on one node. 1: all in this process, no worker.
    num_workers: Optional[int] = None
    # data.format=mixture: the data configs mixed (any conversation format, each a full data config plus its
    # `weight`), the training samples of an epoch drawn from each at its weight's share (weights are normalised).
    # Each source keeps its own reading, cleaning, scrubbing, system prompt and validation split; the mixture's
    # own keys used are packing (after the draw), output_dir, prepared, and as defaults of the sources that leave
    # them unset num_workers, end_of_turn_token and system_prompt (strict=true applies to every source).
    sources: list[MixtureSourceConfig] = field(default_factory=list)
    # Training samples drawn per epoch; None: the sum of the sources' training samples (the size of their plain
    # concatenation), so the weights re-balance the data without changing the epoch's length.
    mixture_samples: Optional[int] = None
    mixture_seed: int = 0  # which samples of a source are repeated or left out: the same seed, the same draw


@dataclass
class MixtureSourceConfig(DataConfig):
    """One source of `data.format=mixture`: a data config, its weight and a name for the report."""

    name: str = ""  # "": the file name of `path` without its extension
    weight: float = MISSING  # > 0; the share of the training samples is weight / the sum of the weights
