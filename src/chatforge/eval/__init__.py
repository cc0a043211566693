"""Evaluation: perplexity, few-shot, gold win-rate, Elo."""
