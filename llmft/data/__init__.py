"""From conversations on disk to tokenized, masked training samples, room by room in the order data flows:
readers/ (one reader per `data.format`: files to conversations), clean/ (HTML, quotes, signatures, personal data and
duplicates out), tokenize/ (tokenizer, chat template and masks, packing, batches), preferences/ (DPO and KTO data),
prepare/ (the data path of a run, on worker processes: `python -m llmft.data prepare`, and what training loads)."""
