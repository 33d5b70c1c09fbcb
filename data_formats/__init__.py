"""Record formats (Alpaca, pairwise preference, prompt-only), prompt templates, converters and the
built-in verifiable task suite. Templates are data files in `templates/`."""
