"""Sequence to sequence translation of a small synthetic language with an encoder-decoder of rnnext
GRUs. The source language counts in English words; its translation uses other words and reverses the
order ("one three two" -> "dos tres uno").

    python examples/translation.py
"""
import random

import torch
from torch import nn

from common import parse, train

import rnnext  # noqa: E402

SOURCE = "zero one two three four five six seven eight nine".split()
TARGET = "cero uno dos tres cuatro cinco seis siete ocho nueve".split()
PAD, BOS, EOS = 0, 1, 2  # target-side specials; target word k is token k + 3
MAX_LEN = 7


def pair(rng):
    n = rng.randint(1, MAX_LEN)
    src = [rng.randrange(10) for _ in range(n)]
    return src, [BOS] + [k + 3 for k in reversed(src)] + [EOS]


class Translator(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.src_embed = nn.Embedding(10, 32)
        self.tgt_embed = nn.Embedding(13, 32)
        self.encoder = rnnext.GRU(32, hidden, batch_first=True)
        self.decoder = rnnext.GRU(32, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 13)

    def encode(self, src, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.src_embed(src), lengths, batch_first=True,
                                                   enforce_sorted=False)
        return self.encoder(packed)[1]

    def forward(self, src, lengths, tgt_in):  # teacher forcing
        y, _ = self.decoder(self.tgt_embed(tgt_in), self.encode(src, lengths))
        return self.out(y)

    @torch.no_grad()
    def translate(self, src, lengths, steps=MAX_LEN + 1):
        h = self.encode(src, lengths)
        tok = torch.full((src.size(0), 1), BOS)
        out = []
        for _ in range(steps):
            y, h = self.decoder(self.tgt_embed(tok), h)
            tok = self.out(y).argmax(-1)
            out.append(tok)
        return torch.cat(out, 1)


def batchify(pairs):
    lengths = torch.tensor([len(s) for s, _ in pairs])
    src = torch.zeros(len(pairs), MAX_LEN, dtype=torch.long)
    tgt = torch.full((len(pairs), MAX_LEN + 2), PAD)
    for i, (s, t) in enumerate(pairs):
        src[i, :len(s)] = torch.tensor(s)
        tgt[i, :len(t)] = torch.tensor(t)
    return src, lengths, tgt


def main(argv=None):
    args = parse(__doc__.split("\n")[0], steps=2000, argv=argv)
    rng = random.Random(args.seed)
    n_train, n_test = (64, 16) if args.tiny else (8000, 500)
    src, lengths, tgt = batchify([pair(rng) for _ in range(n_train)])
    model = Translator()

    def batch(step):
        idx = torch.randint(0, n_train, (64,))
        return src[idx], lengths[idx], tgt[idx]

    def loss_fn(m, s, n, t):
        logits = m(s, n, t[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), t[:, 1:].flatten(), ignore_index=PAD)

    train(model, batch, loss_fn, args.steps, desc="translation")
    test = [pair(rng) for _ in range(n_test)]
    s, n, t = batchify(test)
    pred = model.translate(s, n)
    exact = 0
    for i, (src_i, tgt_i) in enumerate(test):
        want = tgt_i[1:]
        exact += pred[i, :len(want)].tolist() == want
    for i in range(3):
        words = [TARGET[k - 3] for k in pred[i].tolist() if k >= 3][:len(test[i][0])]
        print(f"  {' '.join(SOURCE[k] for k in test[i][0]):40s} -> {' '.join(words)}")
    accuracy = exact / n_test
    print(f"held-out sentences, exact-match accuracy: {accuracy:.3f} ({n_test} sentences)")
    return accuracy


if __name__ == "__main__":
    main()
