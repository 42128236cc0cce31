"""Speculative-decoding drafters."""
