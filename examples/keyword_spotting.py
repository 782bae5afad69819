"""Streaming keyword spotting (speech-like): tell which keyword an utterance of generated "acoustic"
frames contains, with a layer-normalised LSTM trained with zoneout (rnnext.LayerNormLSTM, the RNN-T
encoder's cell, zoneout=0.1), then run it as a streaming recogniser does: chunks of frames, the state
carried from one chunk to the next.

Each keyword is a sequence of phones; a phone is a noisy template frame held for 2-4 frames; keywords sit
between stretches of random phones.

    python examples/keyword_spotting.py
"""
import torch
from torch import nn

from common import parse, train

import rnnext  # noqa: E402

PHONES, FEATURES = 12, 20
KEYWORDS = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [2, 5, 8, 11], [3, 2, 1, 0]]


def utterance(templates, keyword, g, length=None):
    """Frames [T, FEATURES] of random phones, the keyword's phones, random phones (to `length` frames)."""
    def phones(ids):
        return [templates[p] for p in ids for _ in range(int(torch.randint(2, 5, (), generator=g)))]

    before = phones(torch.randint(0, PHONES, (int(torch.randint(1, 4, (), generator=g)),), generator=g).tolist())
    frames = before + phones(KEYWORDS[keyword])
    after = length - len(frames) if length else int(torch.randint(2, 8, (), generator=g))
    frames += phones(torch.randint(0, PHONES, (max(after, 0),), generator=g).tolist())
    frames = torch.stack(frames[:length] if length else frames)
    return frames + 0.7 * torch.randn(frames.shape, generator=g)


class Spotter(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.rnn = rnnext.LayerNormLSTM(FEATURES, hidden, num_layers=2, batch_first=True, zoneout=0.1)
        self.out = nn.Linear(hidden, len(KEYWORDS))

    def forward(self, frames, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(frames, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        return self.out(h[-1])

    def stream(self, frames, chunk):
        """The scores after each chunk of `chunk` frames, the state carried between chunks."""
        state, scores = None, []
        for piece in frames.split(chunk, dim=1):
            _, state = self.rnn(piece, state)
            scores.append(self.out(state[0][-1]))
        return scores


def dataset(n, templates, g, length=None):
    labels = torch.randint(0, len(KEYWORDS), (n,), generator=g)
    items = [utterance(templates, int(k), g, length) for k in labels]
    lengths = torch.tensor([len(x) for x in items])
    return nn.utils.rnn.pad_sequence(items, batch_first=True), lengths, labels


def main(argv=None):
    args = parse(__doc__.split("\n")[0], steps=300, argv=argv)
    g = torch.Generator().manual_seed(args.seed)
    templates = torch.randn(PHONES, FEATURES, generator=g)
    n_train, n_test = (64, 16) if args.tiny else (3000, 500)
    frames, lengths, labels = dataset(n_train, templates, g)
    model = Spotter()

    def batch(step):
        idx = torch.randint(0, n_train, (64,), generator=g)
        return frames[idx], lengths[idx], labels[idx]

    train(model, batch, lambda m, x, n, y: nn.functional.cross_entropy(m(x, n), y), args.steps, desc="keywords")
    model.eval()  # zoneout's deterministic mixture: streaming gives the offline result
    test, test_lengths, test_labels = dataset(n_test, templates, g, length=40)
    with torch.no_grad():
        offline = model(test, test_lengths)
        streamed = model.stream(test, chunk=8)[-1]
    accuracy = (streamed.argmax(-1) == test_labels).float().mean().item()
    print(f"held-out utterances, streamed in chunks of 8 frames: accuracy {accuracy:.3f} "
          f"({n_test} utterances, {len(KEYWORDS)} keywords, chance {1 / len(KEYWORDS):.2f}); "
          f"largest difference from the offline scores {(streamed - offline).abs().max().item():.1e}")
    return accuracy


if __name__ == "__main__":
    main()
