"""Instruction-tuning stage (LoRA SFT, merge, chat)."""
