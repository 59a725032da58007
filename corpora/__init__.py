"""Corpus reading, cleaning and the small sample data the embedded default runs on."""
