"""Vocabulary stage: train a Chinese SentencePiece model, merge it into a LLaMA-layout tokenizer, export and measure."""
