"""Conversation data: the JSONL dialogue format, the synthetic memory-probe generator, the
Shakespeare and Chit Chat dialogue corpora, the stream order of training examples, and a small
generated corpus for the tokenizers of untrained models (benchmarks, tests)."""
