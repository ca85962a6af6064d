"""Knowledge-editing methods (ROME, MEMIT, AlphaEdit, FT-M, ...), one module per method.

Each method computes a delta or memory entries from an edit request and the live model, and never
mutates weights itself; `editserve` applies, journals and undoes. Nothing here knows of HTTP.
"""
