"""Command-line tools: checkpoint merging, sampling, data preparation."""
