"""Preference data for DPO and KTO: dpo_kto.py reads, cleans and tokenizes records of a prompt and judged
completions (data.format=preference_jsonl, kto_jsonl); from_eval.py makes such records from the judged answers of a
run's evaluation (`python -m llmft.data from-eval`)."""
