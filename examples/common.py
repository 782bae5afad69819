"""What every example shares: arguments, and the training loop the lecture recommends
(RMSprop, L2-norm gradient clipping: torch.optim / torch.nn.utils, not rewritten)."""
import argparse
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(description, steps, argv=None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=steps, help="training steps")
    p.add_argument("--tiny", action="store_true", help="a few steps on little data (used by the tests)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.steps = 3
    torch.manual_seed(args.seed)
    return args


def train(model, batch, loss_fn, steps, lr=3e-3, max_norm=1.0, desc="train"):
    """steps of RMSprop on loss_fn(model, *batch(step)), gradients clipped to L2 norm max_norm.
    Returns the last loss."""
    opt = torch.optim.RMSprop(model.parameters(), lr=lr)
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        loss = loss_fn(model, *batch(step))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()
