"""From conversations on disk to tokenized, masked training samples."""
