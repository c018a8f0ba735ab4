"""Tuned option values per stage, as JSON files beside this one (read by options.load_preset)."""
