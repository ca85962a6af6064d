"""The edit memory for memory-based methods (IKE, SERAC, GRACE): encoder, FAISS index, persistence.

Nothing here knows of HTTP or of the journal; `editserve` composes it.
"""
