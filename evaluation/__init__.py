"""Evaluation stage: bits per character across tokenizers, C-Eval/CMMLU multiple choice, generation + LLM judge."""
