"""Builders of the demo model families: synthetic skills (skills.py), a tiny Llama trained from scratch (tiny.py)."""
