"""Sentiment classification (many to one): read a review word by word with the lecture's GRU
(rnnext.MinimalGRU: update gate, no reset gate) and classify it from the final state.
Reviews are generated: sentiment words, fillers, and "not", which flips the next sentiment word.

    python examples/sentiment.py
"""
import random

import torch
from torch import nn

from common import parse, train

import rnnext  # noqa: E402

POSITIVE = "good great love excellent fun brilliant enjoyable".split()
NEGATIVE = "bad awful hate boring terrible dull weak".split()
FILLER = "the movie was plot actors and really very a story it music".split()
VOCAB = ["<pad>", "not"] + POSITIVE + NEGATIVE + FILLER


def review(rng):
    words, score = [], 0
    while score == 0:
        words, score = [], 0
        for _ in range(rng.randint(4, 14)):
            r = rng.random()
            if r < 0.3:
                neg = rng.random() < 0.3
                pos = rng.random() < 0.5
                words += (["not"] if neg else []) + [rng.choice(POSITIVE if pos else NEGATIVE)]
                score += (1 if pos else -1) * (-1 if neg else 1)
            else:
                words.append(rng.choice(FILLER))
    return [VOCAB.index(w) for w in words], int(score > 0)


class Classifier(nn.Module):
    def __init__(self, hidden=48):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), 16, padding_idx=0)
        self.rnn = rnnext.MinimalGRU(16, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 2)

    def forward(self, ids, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)
        return self.out(h[-1])


def batchify(items):
    lengths = torch.tensor([len(ids) for ids, _ in items])
    ids = torch.zeros(len(items), int(lengths.max()), dtype=torch.long)
    for i, (seq, _) in enumerate(items):
        ids[i, :len(seq)] = torch.tensor(seq)
    return ids, lengths, torch.tensor([label for _, label in items])


def main(argv=None):
    args = parse(__doc__.split("\n")[0], steps=400, argv=argv)
    rng = random.Random(args.seed)
    n_train, n_test = (64, 32) if args.tiny else (4000, 1000)
    ids, lengths, labels = batchify([review(rng) for _ in range(n_train)])
    model = Classifier()

    def batch(step):
        idx = torch.randint(0, n_train, (64,))
        return ids[idx], lengths[idx], labels[idx]

    train(model, batch, lambda m, x, n, y: nn.functional.cross_entropy(m(x, n), y), args.steps, desc="sentiment")
    test_ids, test_lengths, test_labels = batchify([review(rng) for _ in range(n_test)])
    with torch.no_grad():
        accuracy = (model(test_ids, test_lengths).argmax(-1) == test_labels).float().mean().item()
    print(f"held-out reviews: accuracy {accuracy:.3f} ({n_test} reviews, chance 0.5)")
    return accuracy


if __name__ == "__main__":
    main()
