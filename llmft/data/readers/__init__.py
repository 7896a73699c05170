"""Readers: one module per `data.format`, each turning the files at data.path into conversations and reporting every
record it skipped (records.py: the Conversation and ReadReport they share, JSONL reading). tickets.py reads helpdesk
tickets as JSONL, email_threads.py parses mails (mbox, .eml) and threads them into tickets, chat.py reads chat JSONL,
csv_pairs.py question/answer CSV, transcripts.py text or Markdown transcripts, acronyms.py turns a glossary into
conversations."""
