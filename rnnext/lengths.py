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


def check_lengths(lengths, T):
    """Every length in [1, T], as torch.nn's pack_padded_sequence requires. Checked where the values are on the
    CPU (the layers check theirs there, before moving them): on CUDA reading them would sync, and the kernels
    treat a length past T as T and one below 1 as an empty sequence."""
    if lengths is None or lengths.numel() == 0 or lengths.device.type != "cpu" or torch.compiler.is_compiling():
        return
    lo, hi = torch.aminmax(lengths)
    if lo < 1 or hi > T:
        raise RuntimeError(f"recurrence: expected lengths in [1, {T}] (T, the sequence length), got values in "
                           f"[{int(lo)}, {int(hi)}]")


def check_batch_sizes(batch_sizes, rows):
    """A PackedSequence's batch_sizes: non-negative, non-increasing, at most its rows in all (what
    pad_packed_sequence assumes without checking: it corrupts memory otherwise)."""
    if torch.compiler.is_compiling() or batch_sizes.numel() == 0:
        return
    if (batch_sizes < 0).any() or (batch_sizes[1:] > batch_sizes[:-1]).any() or batch_sizes.sum() > rows:
        raise RuntimeError(f"batch_sizes must be non-negative, non-increasing and sum to at most the {rows} rows of "
                           f"the packed data, got {batch_sizes.tolist()}")
