"""Conversation data: the JSONL dialogue format, the synthetic memory-probe generator, the
Shakespeare dialogue corpus, the stream order of training examples, and a small generated corpus
for the tokenizers of untrained models (benchmarks, tests)."""
