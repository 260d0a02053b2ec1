"""Evaluation: recall by distance, perplexity, BLEU and the composite reward."""
