"""Many to many, a character-level language model on sLSTM blocks (xLSTM's: a pre-norm residual sLSTM with
heads, then a gated feed-forward). The language: balanced strings of two kinds of brackets, "([])[]...", generated
here. Which bracket opens is random; which one closes is not: it has to match the innermost open one, so the
model must remember a stack. Scored on the closing brackets: how often the right kind of closing bracket gets
the higher probability.

    python examples/language_model.py
"""
import torch
from torch import nn

from common import parse, train

import rnnext  # noqa: E402

CHARS = "([)]"  # openers at even indices, their closers next to them
T = 48


def sample(batch, gen=None):
    """[batch, T] strings of the language (indices into CHARS), each balanced at its end."""
    out = torch.empty(batch, T, dtype=torch.long)
    coin = torch.rand(batch, T, generator=gen)
    kind = torch.randint(0, 2, (batch, T), generator=gen)
    for b in range(batch):
        stack = []
        for t in range(T):
            close = stack and (len(stack) >= T - t or coin[b, t] < 0.5)
            if close:
                out[b, t] = 2 * stack.pop() + 1
            else:
                stack.append(int(kind[b, t]))
                out[b, t] = 2 * stack[-1]
    return out


class Block(nn.Module):
    """x + sLSTM(LN(x)), then x + FFN(LN(x)) with a GELU-gated feed-forward."""

    def __init__(self, width, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.cell = rnnext.sLSTM(width, width, batch_first=True, num_heads=heads)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        x = x + self.cell(self.norm1(x))[0]
        a, g = self.up(self.norm2(x)).chunk(2, -1)
        return x + self.down(a * nn.functional.gelu(g))


class Model(nn.Module):
    def __init__(self, width=64, heads=4, blocks=2):
        super().__init__()
        self.embed = nn.Embedding(len(CHARS) + 1, width)  # + a start symbol
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(blocks)])
        self.out = nn.Linear(width, len(CHARS))

    def forward(self, s):  # predicts s[:, t] from s[:, :t]
        prev = torch.cat([torch.full_like(s[:, :1], len(CHARS)), s[:, :-1]], 1)
        return self.out(self.blocks(self.embed(prev)))


def closing_accuracy(model, s):
    """Among the positions that close a bracket: how often the right closer outscores the wrong one."""
    with torch.no_grad():
        logits = model(s)
    closing = s % 2 == 1
    right = logits.gather(2, s.unsqueeze(2)).squeeze(2)
    wrong = logits.gather(2, (s ^ 2).unsqueeze(2)).squeeze(2)  # ")" <-> "]": indices 1 <-> 3
    return ((right > wrong) & closing).sum().item() / closing.sum().item()


def main(argv=None):
    args = parse(__doc__.split("\n")[0], steps=400, argv=argv)
    model = Model()
    batch_size = 8 if args.tiny else 32

    def loss_fn(m, s):
        return nn.functional.cross_entropy(m(s).flatten(0, 1), s.flatten())

    train(model, lambda step: (sample(batch_size),), loss_fn, args.steps, desc="language model")
    accuracy = closing_accuracy(model, sample(16 if args.tiny else 256, torch.Generator().manual_seed(1)))
    print(f"closing brackets of fresh strings, right kind preferred (accuracy): {accuracy:.2f} (chance 0.5)")
    return accuracy


if __name__ == "__main__":
    main()
