"""Measurement kinds; each module registers its own (discovered automatically)."""
