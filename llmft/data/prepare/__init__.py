"""The data path of a run, cut by path: reading.py reads, cleans, scrubs and deduplicates data.path into conversations;
tokenizing.py turns them into the samples of each split (tokenizing_preferences.py for preference data); one_pass.py
does both in one worker pass when the tokenizer is known first; splits.py assigns train / validation / test by hash;
mixture.py mixes several data sets at their weights; workers.py runs the chunks on several processes, in order.
command.py is `python -m llmft.data prepare`, which writes the prepared folder (prepared_dir.py: samples, fingerprint,
manifest); samples_for_run.py gives training its samples (reused from that folder when the fingerprint matches);
inspect_samples.py is `python -m llmft.data inspect`; data_config.py reads the data config's format and path."""
