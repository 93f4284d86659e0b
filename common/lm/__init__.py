"""Language-model data and evaluation: corpora and token windows, MediaWiki text, perplexity, zero-shot."""
