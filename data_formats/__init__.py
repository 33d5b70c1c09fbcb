"""Record formats (Alpaca, conversations, pairwise preference, prompt-only), how they are rendered (text
templates, chat templates), converters and the built-in verifiable task suite. Text templates and the
shipped chat template are data files in `templates/`."""
