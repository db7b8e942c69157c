"""Training data for the client: user JSONL files, the built-in movie-review task, prompt
templates, client splits, tokenising collation and seeded batch sampling."""
