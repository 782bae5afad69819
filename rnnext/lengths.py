"""Variable-length sequences, time-major ``[T, B, ...]`` with ``lengths [B]``: shared by the reference and
the fused ops' wrappers."""
import torch


def flip_within(x, lengths):
    """Reverses each sequence of a time-major ``x [T, B, ...]`` within its length; padding stays put."""
    if lengths is None:
        return x.flip(0)
    T = x.size(0)
    t = torch.arange(T, device=x.device).unsqueeze(1)
    idx = torch.where(t < lengths, lengths - 1 - t, t)  # [T, B]
    return x.gather(0, idx.view(T, -1, *([1] * (x.dim() - 2))).expand_as(x))


def step_mask(lengths, T):
    """``[T, B, 1]`` bool: step t of sequence b is within its length."""
    return (torch.arange(T, device=lengths.device).unsqueeze(1) < lengths).unsqueeze(2)
