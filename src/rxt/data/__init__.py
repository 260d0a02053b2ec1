"""Conversation data: the JSONL dialogue format, the synthetic memory-probe generator and the
Shakespeare dialogue corpus."""
