"""Tokenizing: tokenizer.py loads the run's tokenizer (or trains one for model=tiny), templating.py applies the chat
template and puts labels on assistant turns only (the `Sample`), packing.py packs samples into rows, rows.py holds
the samples of a split as flat int32 arrays, and batching.py turns samples into the batches training takes."""
