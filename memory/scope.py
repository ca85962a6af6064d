"""SERAC's trained scope classifier: is a query within the scope of an edit's question?

Mitchell et al. train a classifier on in-scope and out-of-scope examples of the edits a
deployment sees. Here it is a small network over the frozen sentence encoder's embeddings of
the two texts, so the edit memory keeps its one embedding per entry and a query is still
embedded once: features of the pair (elementwise product, absolute difference, cosine) go
through one hidden layer to the log-odds that the query is in scope. It is symmetric in its two
texts.

Training examples come from edit datasets (`ScopeExample`): an edit's question is in scope of
itself and of its paraphrases; out of scope are the record's locality prompts (in KnowEdit the
same subject's other relations: the hardest negatives for a sentence encoder) and the questions
of other records nearest to it (often the same template on another subject). The threshold is
calibrated on held-out records (`calibrate`). docs/memory-edits.md has the figures.

The classifier ranks only what the memory retrieves: the `CANDIDATES` entries nearest by
cosine, so its cost per chat request is a few microseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from memory.encoder import intra_op_threads

CANDIDATES = 4  # entries nearest by cosine that the classifier judges per query
GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # thresholds tried by `calibrate`


class Encoder(Protocol):
    def encode(self, texts: list[str]) -> torch.Tensor: ...


def pair_features(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, d] x [n, d] unit rows -> [n, 2d + 1]; symmetric in a and b."""
    product = a * b
    return torch.cat([product, (a - b).abs(), product.sum(-1, keepdim=True)], -1)


class ScopeClassifier(nn.Module):
    """P(query in scope of entry) from their sentence embeddings."""

    def __init__(self, dim: int = 384, hidden: int = 256, threshold: float = 0.5) -> None:
        super().__init__()
        self.dim, self.hidden, self.threshold = dim, hidden, threshold
        self.net = nn.Sequential(nn.Linear(2 * dim + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.info: dict[str, Any] = {}  # what it was trained and calibrated on

    def forward(self, queries: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """Log-odds [n] for n (query, entry) pairs."""
        return self.net(pair_features(queries, entries)).squeeze(-1)

    @torch.no_grad()
    def probability(self, query: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """[1 or n, d] query, [n, d] entries -> [n] probabilities (on one thread: it runs on
        request threads, beside the engine's; see `intra_op_threads`)."""
        entries = entries.float()
        query = query.float().expand_as(entries)
        with intra_op_threads(1):
            return torch.sigmoid(self(query, entries))

    def save(self, path: Path) -> None:
        meta = {"dim": self.dim, "hidden": self.hidden, "threshold": self.threshold}
        meta["info"] = self.info
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"scope_classifier": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path) -> ScopeClassifier:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no scope classifier at {path}")
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["scope_classifier"])
            classifier = cls(meta["dim"], meta["hidden"], float(meta["threshold"]))
            classifier.load_state_dict(load_file(str(path)))
        except Exception as exc:  # a damaged or foreign file: say what it should be
            raise ValueError(
                f"{path} is not a scope classifier written by `editserve train-scope` ({exc})"
            ) from exc
        classifier.info = meta.get("info", {})
        return classifier.eval()


# -- training data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScopeExample:
    """One edit's question, texts in its scope, texts out of it, and the subject it is about
    (other records on the same subject are not used as "other question" negatives)."""

    question: str
    paraphrases: tuple[str, ...]
    outside: tuple[str, ...]
    subject: str


@dataclass
class EmbeddedExamples:
    questions: torch.Tensor  # [n, d]
    paraphrases: torch.Tensor  # [m, d]
    paraphrase_of: torch.Tensor  # [m] question index
    outside: torch.Tensor  # [l, d]
    outside_of: torch.Tensor  # [l]
    same_subject: torch.Tensor  # [n, n] bool

    @classmethod
    def embed(cls, encoder: Encoder, examples: list[ScopeExample]) -> EmbeddedExamples:
        def flat(texts: list[tuple[str, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
            owner = [i for i, group in enumerate(texts) for _ in group]
            joined = [t for group in texts for t in group]
            vectors = encoder.encode(joined) if joined else torch.zeros(0, 0)
            return vectors.float(), torch.tensor(owner, dtype=torch.long)

        paraphrases, paraphrase_of = flat([e.paraphrases for e in examples])
        outside, outside_of = flat([e.outside for e in examples])
        subjects = [e.subject for e in examples]
        return cls(
            questions=encoder.encode([e.question for e in examples]).float(),
            paraphrases=paraphrases,
            paraphrase_of=paraphrase_of,
            outside=outside,
            outside_of=outside_of,
            same_subject=torch.tensor([[a == b for b in subjects] for a in subjects]),
        )

    def nearest_others(
        self, queries: torch.Tensor, owner: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([len(queries), k] indices, [len(queries), k] bool): the questions nearest by cosine
        to each query, leaving out its own record and records on the same subject; the mask is
        False where fewer than k others exist (the index there is one left out)."""
        sims = queries @ self.questions.T
        sims[self.same_subject[owner]] = -2.0  # below any cosine
        top = sims.topk(min(k, len(self.questions)), dim=1)
        return top.indices, top.values > -2.0


def training_pairs(
    data: EmbeddedExamples, hard: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(queries [P, d], entries [P, d], labels [P]): every question with itself and its
    paraphrases (1), its outside texts (0), and the `hard` nearest other questions to it and to
    each of its paraphrases (0)."""
    q = data.questions
    everyone = torch.arange(len(q))
    queries, entries, labels = [], [], []

    def add(query: torch.Tensor, entry: torch.Tensor, label: float) -> None:
        queries.append(query)
        entries.append(entry)
        labels.append(torch.full((len(query),), label))

    add(q, q, 1.0)
    add(data.paraphrases, q[data.paraphrase_of], 1.0)
    add(data.outside, q[data.outside_of], 0.0)
    for texts, owner in ((q, everyone), (data.paraphrases, data.paraphrase_of)):
        others, real = data.nearest_others(texts, owner, hard)  # [len(texts), hard] each
        pairs = texts.repeat_interleave(others.shape[1], 0)
        add(pairs[real.flatten()], q[others[real]], 0.0)
    return torch.cat(queries), torch.cat(entries), torch.cat(labels)


def train(
    data: EmbeddedExamples,
    epochs: int = 30,
    hidden: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    hard: int = 5,
) -> ScopeClassifier:
    """A classifier fitted to `data`'s pairs (positives up-weighted to balance the classes)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classifier = ScopeClassifier(data.questions.shape[1], hidden)
    queries, entries, labels = training_pairs(data, hard)
    positive_weight = (1 - labels).sum() / labels.sum().clamp(min=1)
    optimiser = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-2)
    classifier.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(256):
            logits = classifier(queries[batch], entries[batch])
            loss = nn.functional.binary_cross_entropy_with_logits(
                logits, labels[batch], pos_weight=positive_weight
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return classifier.eval()


# -- calibration -------------------------------------------------------------------------------


@dataclass
class ScopeScores:
    """Scores of held-out records with all their questions in memory at once, as a server holds
    them: a paraphrase against its own entry (should fire), a question against the best of its
    `CANDIDATES` nearest other entries (should not), an outside text against its record's entry
    (should not)."""

    paraphrase: torch.Tensor
    other: torch.Tensor
    outside: torch.Tensor

    def rates(self, threshold: float) -> dict[str, float]:
        def share(x: torch.Tensor) -> float:
            return round(float((x >= threshold).float().mean()), 4) if len(x) else 0.0

        return {
            "threshold": threshold,
            "paraphrase_fires": share(self.paraphrase),
            "other_question_fires": share(self.other),
            "outside_fires": share(self.outside),
        }


def cosine_scores(data: EmbeddedExamples) -> ScopeScores:
    """The similarity classifier's scores (SERAC's default: cosine against a threshold)."""
    q = data.questions
    best_other = (q @ q.T).masked_fill(data.same_subject, -2.0).max(1).values
    return ScopeScores(
        paraphrase=(data.paraphrases * q[data.paraphrase_of]).sum(1),
        other=best_other,
        outside=(data.outside * q[data.outside_of]).sum(1),
    )


@torch.no_grad()
def classifier_scores(classifier: ScopeClassifier, data: EmbeddedExamples) -> ScopeScores:
    """The trained classifier's scores, judging each query's `CANDIDATES` nearest entries by
    cosine (as `MemoryEdits.retrieve` does)."""
    q = data.questions
    others, real = data.nearest_others(q, torch.arange(len(q)), CANDIDATES)  # [n, c] each
    c = others.shape[1]
    probs = classifier.probability(q.repeat_interleave(c, 0), q[others.flatten()])
    probs = probs.masked_fill(~real.flatten(), 0.0)  # no other question there: nothing fires
    # A paraphrase reaches its own entry only if retrieval puts that among the candidates.
    near = (data.paraphrases @ q.T).topk(min(CANDIDATES, len(q)), dim=1).indices  # [m, c]
    retrieved = (near == data.paraphrase_of[:, None]).any(1)
    own = classifier.probability(data.paraphrases, q[data.paraphrase_of])
    return ScopeScores(
        paraphrase=own.masked_fill(~retrieved, 0.0),
        other=probs.view(-1, c).max(1).values if c else torch.zeros(len(q)),
        outside=classifier.probability(data.outside, q[data.outside_of]),
    )


def calibrate(scores: ScopeScores) -> tuple[float, list[dict[str, float]]]:
    """(threshold, the table of rates over `GRID`): the threshold that maximises paraphrases
    fired minus the mean of the two false-firing rates (other questions, outside texts)."""
    table = [scores.rates(t) for t in GRID]

    def merit(row: dict[str, float]) -> float:
        false = (row["other_question_fires"] + row["outside_fires"]) / 2
        return row["paraphrase_fires"] - false

    return max(table, key=merit)["threshold"], table
