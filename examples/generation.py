"""One to many: a vector in, a sequence out (as in image captioning). The vector stands for a number
from 0 to 99 (a noisy encoding of its two digits, like an image's features); an rnnext.LSTMCell decoder
starts from it and spells the number in English, letter by letter.

    python examples/generation.py
"""
import torch
from torch import nn

from common import parse, train

import rnnext  # noqa: E402

ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
CHARS = ["<eos>", "<bos>"] + sorted(set("".join(ONES + TEENS + TENS[2:]) + " "))
MAX_CHARS = 16


def spell(n):
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])


def features(numbers, noise=0.1):
    """A 20-dim 'image' of each number: one-hot tens digit, one-hot ones digit, plus noise."""
    x = torch.zeros(len(numbers), 20)
    x[torch.arange(len(numbers)), numbers // 10] = 1.0
    x[torch.arange(len(numbers)), 10 + numbers % 10] = 1.0
    return x + noise * torch.randn_like(x)


def targets(numbers):
    t = torch.zeros(len(numbers), MAX_CHARS, dtype=torch.long)  # <eos> after the word, then padding
    for i, n in enumerate(numbers.tolist()):
        t[i, :len(spell(n))] = torch.tensor([CHARS.index(c) for c in spell(n)])
    return t


class Speller(nn.Module):
    def __init__(self, hidden=96):
        super().__init__()
        self.init = nn.Linear(20, 2 * hidden)
        self.embed = nn.Embedding(len(CHARS), 24)
        self.cell = rnnext.LSTMCell(24, hidden)
        self.out = nn.Linear(hidden, len(CHARS))

    def forward(self, x, prev):  # teacher forcing: prev = the previous characters, <bos> first
        h, c = self.init(x).tanh().chunk(2, 1)
        logits = []
        for t in range(prev.size(1)):
            h, c = self.cell(self.embed(prev[:, t]), (h, c))
            logits.append(self.out(h))
        return torch.stack(logits, 1)

    @torch.no_grad()
    def generate(self, x):
        h, c = self.init(x).tanh().chunk(2, 1)
        tok, out = torch.full((x.size(0),), CHARS.index("<bos>")), []
        for _ in range(MAX_CHARS):
            h, c = self.cell(self.embed(tok), (h, c))
            tok = self.out(h).argmax(-1)
            out.append(tok)
        return ["".join(CHARS[k] for k in row).split("<eos>")[0] for row in torch.stack(out, 1).tolist()]


def shifted(t):
    return torch.cat([torch.full((t.size(0), 1), CHARS.index("<bos>")), t[:, :-1]], 1)


def main(argv=None):
    args = parse(__doc__.split("\n")[0], steps=800, argv=argv)
    model = Speller()

    def batch(step):
        numbers = torch.randint(0, 100, (64,))
        t = targets(numbers)
        return features(numbers), shifted(t), t

    def loss_fn(m, x, prev, t):
        return nn.functional.cross_entropy(m(x, prev).flatten(0, 1), t.flatten())

    train(model, batch, loss_fn, args.steps, desc="generation")
    numbers = torch.arange(100)
    words = model.generate(features(numbers))
    accuracy = sum(w == spell(n) for w, n in zip(words, numbers.tolist())) / 100
    for n in (7, 13, 42, 90):
        print(f"  {n:3d} -> {words[n]!r}")
    print(f"numbers 0-99 from fresh noisy vectors, exact-spelling accuracy: {accuracy:.2f}")
    return accuracy


if __name__ == "__main__":
    main()
