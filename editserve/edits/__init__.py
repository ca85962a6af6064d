"""Edits of the live model: validation, methods, the weight ledger, the journal, undo."""
