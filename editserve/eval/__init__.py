"""KnowEdit-style evaluation of edits, driven through a running server's public API.

`datasets` reads the benchmark formats into one record shape, `client` talks to the server,
`measure` observes one record (answers, teacher-forced tokens, fluency text), `metrics` turns
observations into numbers, `runner` applies, scores and undoes edits (resumably), `report` writes
the JSON summary and Markdown tables, and `cli` is `editserve eval`.
"""
