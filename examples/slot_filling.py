"""Slot filling, the lecture's running example: tag each word of a travel request as destination,
place of departure, time or other, with a deep bidirectional rnnext.LSTM.

Words are 1-of-N vectors over the training vocabulary plus an "other" dimension for unknown words,
concatenated with word hashing (letter trigrams), so cities never seen in training still get a
vector. Held-out sentences use unseen cities.

    python examples/slot_filling.py
"""
import random
import zlib

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from common import parse, train

import rnnext  # noqa: E402  (path set by common)

SLOTS = ["other", "dest", "depart", "time"]
TEMPLATES = [  # (words, slot of {a}, slot of {b})
    ("i would like to arrive {a} on {m} {d}", "dest", None),
    ("i want to leave {a} on {m} {d}", "depart", None),
    ("please book a flight from {a} to {b} on {m} {d}", "depart", "dest"),
    ("arriving in {a} on {m} {d} please", "dest", None),
    ("departing {a} {m} {d}", "depart", None),
    ("fly to {a} from {b} on {m} {d}", "dest", "depart"),
]
CITIES = ("taipei tokyo paris berlin madrid lisbon oslo rome vienna prague dublin athens cairo lima quito "
          "boston denver austin miami seattle").split()
UNSEEN = "toronto chicago houston sydney munich warsaw".split()
MONTHS = "january february march april may june july august september october november december".split()
DAYS = "1st 2nd 3rd 4th 5th 10th 15th 20th 21st 30th".split()
TRIGRAM_DIMS = 128


def sentence(rng, cities):
    words, sa, sb = rng.choice(TEMPLATES)
    a, b = rng.sample(cities, 2)
    tokens, tags = [], []
    for w in words.split():
        if w in ("{a}", "{b}"):
            tokens.append(a if w == "{a}" else b)
            tags.append(sa if w == "{a}" else sb)
        elif w in ("{m}", "{d}"):
            tokens.append(rng.choice(MONTHS) if w == "{m}" else rng.choice(DAYS))
            tags.append("time")
        else:
            tokens.append(w)
            tags.append("other")
    return tokens, [SLOTS.index(t) for t in tags]


def trigrams(word):
    w = f"#{word}#"
    return [w[i:i + 3] for i in range(len(w) - 2)]


class Encoder:
    """1-of-N over the vocabulary, one "other" dimension, and hashed letter trigrams."""

    def __init__(self, vocab):
        self.index = {w: i for i, w in enumerate(sorted(vocab))}
        self.dims = len(self.index) + 1 + TRIGRAM_DIMS

    def __call__(self, word):
        v = torch.zeros(self.dims)
        v[self.index.get(word, len(self.index))] = 1.0
        for g in trigrams(word):
            v[len(self.index) + 1 + zlib.crc32(g.encode()) % TRIGRAM_DIMS] += 1.0
        return v


class Tagger(nn.Module):
    def __init__(self, dims, hidden=32):
        super().__init__()
        self.rnn = rnnext.LSTM(dims, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.out = nn.Linear(2 * hidden, len(SLOTS))

    def forward(self, x, lengths):
        y, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        y, _ = pad_packed_sequence(y, batch_first=True, total_length=x.size(1))
        return self.out(y)


def batchify(sentences, enc):
    lengths = torch.tensor([len(s[0]) for s in sentences])
    x = torch.zeros(len(sentences), int(lengths.max()), enc.dims)
    y = torch.full((len(sentences), int(lengths.max())), -100)
    for i, (tokens, tags) in enumerate(sentences):
        x[i, :len(tokens)] = torch.stack([enc(w) for w in tokens])
        y[i, :len(tags)] = torch.tensor(tags)
    return x, lengths, y


def main(argv=None):
    args = parse(__doc__.split("\n")[0], steps=150, argv=argv)
    rng = random.Random(args.seed)
    n_train, n_test = (64, 32) if args.tiny else (2000, 400)
    train_set = [sentence(rng, CITIES) for _ in range(n_train)]
    test_set = [sentence(rng, UNSEEN) for _ in range(n_test)]
    enc = Encoder({w for tokens, _ in train_set for w in tokens})
    data = batchify(train_set, enc)
    model = Tagger(enc.dims)

    def batch(step):
        idx = torch.randint(0, n_train, (32,))
        return data[0][idx], data[1][idx], data[2][idx]

    def loss_fn(m, x, lengths, y):
        return nn.functional.cross_entropy(m(x, lengths).flatten(0, 1), y.flatten(), ignore_index=-100)

    train(model, batch, loss_fn, args.steps, desc="slot filling")
    x, lengths, y = batchify(test_set, enc)
    with torch.no_grad():
        pred = model(x, lengths).argmax(-1)
    print("held-out sentences with unseen cities, accuracy per slot:")
    result = {}
    for k, slot in enumerate(SLOTS):
        mask = y == k
        result[slot] = (pred[mask] == k).float().mean().item() if mask.any() else float("nan")
        print(f"  {slot:7s} {result[slot]:.3f}  ({int(mask.sum())} words)")
    return result


if __name__ == "__main__":
    main()
