"""rnnext fused vs torch.nn vs rnnext reference: time ratios side by side in one run, peak memory.

    python benchmarks/bench.py                 # default sweep on the present device, < 3 min on 2 CPU cores
    python benchmarks/bench.py --full          # batch 1..256, hidden 64..1024, T up to 1000
    python benchmarks/bench.py --device cuda --dtype bfloat16 --cells lstm,gru

Cells: lstm, gru, rnn vs torch.nn; lnlstm, lngru (rnnext.LayerNormLSTM/GRU) and zlstm (rnnext.LSTM with
zoneout 0.1, training) vs the Python loops a user writes today (loops.py), in the "torch.nn" column; slstm
(rnnext.sLSTM) and hlstm (rnnext.LSTM), 4 heads each, vs FlashRNN's vanilla PyTorch loop (PyPI flashrnn) there.

Times are medians of torch.utils.benchmark measurements (with torch's thread count: torch.nn uses
every core), the candidates interleaved round by round so that drift hits all alike. "of mm": rnnext's GEMM
GFLOP/s as a fraction of torch.mm 2048^3's in the row's dtype (median of three, once per run): how far the row
is from what the machine's GEMM reaches. fwd runs under
no_grad; fwd+bwd is forward plus backward of the output's sum, with the input requiring grad (a layer after
another); "fwd+bwd, x no grad" the same with an input that needs no gradient (a first layer: no dx), for
torch.nn as for rnnext. Peak memory is what fwd+bwd adds on
top of the inputs and weights (CUDA: max_memory_allocated; CPU: peak RSS growth, each candidate in
its own process): for the long-sequence configs of MEMORY, and with --full for every config. Writes
<out>/<device>-<dtype>.{csv,md,png}; prints the Markdown table last.
"""
import argparse
import csv
import functools
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rnnext  # noqa: E402
import loops  # noqa: E402

# cell: (rnnext's, the baseline, gates). For what torch.nn lacks the baseline (the "torch.nn" column) is
# the Python loop a user writes today (loops.py).
CELLS = {"lstm": (rnnext.LSTM, torch.nn.LSTM, 4), "gru": (rnnext.GRU, torch.nn.GRU, 3),
         "rnn": (rnnext.RNN, torch.nn.RNN, 1), "lnlstm": (rnnext.LayerNormLSTM, loops.LayerNormLSTMLoop, 4),
         "lngru": (rnnext.LayerNormGRU, loops.LayerNormGRULoop, 3),
         "zlstm": (functools.partial(rnnext.LSTM, zoneout=0.1), loops.ZoneoutLSTMLoop, 4),
         "slstm": (functools.partial(rnnext.sLSTM, num_heads=4),
                   functools.partial(loops.FlashRNNVanilla, "slstm", heads=4), 4),
         "hlstm": (functools.partial(rnnext.LSTM, num_heads=4),
                   functools.partial(loops.FlashRNNVanilla, "lstm", heads=4), 4)}
HEADS = {"slstm": 4, "hlstm": 4}  # the recurrence's heads: W_hh has 1/heads of the dense one's multiply-adds
CANDIDATES = ("rnnext", "rnnext-persistent", "torch.nn", "reference")
# rnnext's backend per candidate ("fused": the kernels, also where "auto" runs the reference on CUDA because they
# never ran on a GPU); the persistent kernels exist on CUDA only (on CPU an emulation for tests)
BACKEND = {"rnnext": "fused", "rnnext-persistent": "persistent", "reference": "reference"}
DEFAULT = {"cpu": [(100, 32, 256, 256), (100, 8, 128, 128), (50, 64, 512, 512)],
           "cuda": [(100, 1, 256, 256), (100, 16, 512, 512), (100, 64, 512, 512), (1024, 16, 768, 768),
                    (100, 256, 1024, 1024)]}
SMOKE = [(3, 2, 4, 12)]  # H divisible by the heads rows' 4, not by 8
# (cell, (T, B, I, H)) whose fwd+bwd peak memory is reported on its own: long sequences
MEMORY = {"cpu": [("lstm", (1000, 32, 256, 256))], "cuda": [("lstm", (1000, 64, 512, 512))]}


def full_sweep():
    """batch 1..256, hidden 64..1024, T up to 1000 (T, B, I, H), I = H."""
    cfgs = [(100, b, 256, 256) for b in (1, 8, 32, 128, 256)]
    cfgs += [(100, 32, h, h) for h in (64, 128, 512, 1024)]
    cfgs += [(t, 32, 256, 256) for t in (10, 1000)]
    return cfgs


MODES = ("fwd", "fwd+bwd", "fwd+bwd, x no grad")


def flops(cell, T, B, I, H, mode="fwd"):
    """GEMM FLOPs: forward (input projection + recurrence); backward twice that (the steps' dh and dW_hh, dx and
    dW_ih), less dx's without an input gradient."""
    G = CELLS[cell][2]
    fwd = 2 * T * B * G * H * (I + H // HEADS.get(cell, 1))
    return {"fwd": fwd, "fwd+bwd": 3 * fwd, "fwd+bwd, x no grad": 3 * fwd - 2 * T * B * G * H * I}[mode]


def build(cell, cand, T, B, I, H, device, dtype):
    ours_cls, nn_cls, _ = CELLS[cell]
    torch.manual_seed(0)
    model = (nn_cls if cand == "torch.nn" else ours_cls)(I, H).to(device, dtype)
    x = torch.randn(T, B, I, device=device, dtype=dtype)
    backend = BACKEND.get(cand, "auto")

    def fwd():
        with torch.no_grad(), rnnext.use_backend(backend):
            model(x)

    def fwd_bwd(input_grad=True):
        with rnnext.use_backend(backend):
            y, _ = model(x.requires_grad_(input_grad))
        y.sum().backward()
        x.grad = None
        model.zero_grad(set_to_none=True)

    return fwd, fwd_bwd, functools.partial(fwd_bwd, False)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fns, device, rounds, target=0.05):
    """Median seconds per call of each fn, interleaved: every round times every candidate once."""
    nt = torch.get_num_threads()
    timers, numbers = {}, {}
    for name, fn in fns.items():
        fn()
        sync(device)
        timers[name] = Timer("fn(); sync(device)", globals=dict(fn=fn, sync=sync, device=device), num_threads=nt)
        once = timers[name].timeit(1).median
        numbers[name] = max(1, int(target / max(once, 1e-6)))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name in fns:
            samples[name].append(timers[name].timeit(numbers[name]).median)
    return {name: statistics.median(v) for name, v in samples.items()}


def mm_rate(device, dtype, n=2048):
    """GFLOP/s of torch.mm n x n x n in dtype: the machine's large-GEMM rate, median of three timings."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)
    sync(device)
    timer = Timer("torch.mm(a, b); sync(device)", globals=dict(torch=torch, a=a, b=b, sync=sync, device=device),
                  num_threads=torch.get_num_threads())
    return 2 * n**3 / statistics.median(timer.timeit(1).median for _ in range(3)) / 1e9


def peak_memory_child(cell, cand, T, B, I, H, device, dtype):
    """Runs in a fresh process: bytes fwd+bwd adds on top of model and input."""
    _, fwd_bwd, _ = build(cell, cand, T, B, I, H, device, getattr(torch, dtype))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    def status(key):  # kB figures of /proc/self/status
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
        f.write("5")
    base = status("VmRSS:")
    fwd_bwd()
    return status("VmHWM:") - base


def peak_memory(cell, cand, T, B, I, H, device, dtype):
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import bench; "
            f"print(bench.peak_memory_child({cell!r}, {cand!r}, {T}, {B}, {I}, {H}, {device!r}, {dtype!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def machine(device):
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    model = platform.processor() or "cpu"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--cells", default="lstm,gru,rnn,lnlstm,lngru,zlstm,slstm,hlstm")
    p.add_argument("--full", action="store_true", help="the larger sweep (minutes to hours on a CPU)")
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--smoke", action="store_true", help="one tiny config: checks the script end to end")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) reference")
    p.add_argument("--no-persistent", action="store_true", help="skip the persistent CUDA kernels")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    try:
        from tqdm import tqdm
    except ImportError:  # the lent GPU machines have no tqdm and no network
        def tqdm(it, **_):
            return it

    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    for c in cells:
        if c not in CELLS:
            p.error(f"unknown cell {c!r}; choose from {sorted(CELLS)}")
    configs = SMOKE if args.smoke else full_sweep() if args.full else DEFAULT[args.device]
    cands = [c for c in CANDIDATES if not (args.no_reference and c == "reference")
             and not (c == "rnnext-persistent" and (args.device != "cuda" or args.no_persistent))]
    rounds = 3 if (args.quick or args.smoke) else 5
    dtype = getattr(torch, args.dtype)
    mem_cands = [c for c in cands if c != "reference"]
    rows = []
    rate = mm_rate(args.device, dtype)  # each row's "of mm": its GFLOP/s as a fraction of this
    work = [(cell, cfg) for cfg in configs for cell in cells]
    for cell, (T, B, I, H) in tqdm(work, desc="benchmark", unit="config"):
        fns = {c: build(cell, c, T, B, I, H, args.device, dtype) for c in cands}
        for k, mode in enumerate(MODES):
            t = measure({c: fns[c][k] for c in cands}, args.device, rounds)
            gf = flops(cell, T, B, I, H, mode) / t["rnnext"] / 1e9
            row = dict(cell=cell, T=T, B=B, I=I, H=H, dtype=args.dtype, mode=mode,
                       **{f"{c} ms": round(t[c] * 1e3, 4) for c in cands},
                       **{f"{c}/torch.nn": round(t[c] / t["torch.nn"], 3) for c in cands if c != "torch.nn"},
                       **{"rnnext GFLOP/s": round(gf, 1), "of mm": round(gf / rate, 3)})
            if mode == "fwd+bwd" and args.full and not args.no_memory:
                for c in mem_cands:
                    row[f"{c} peak MB"] = round(peak_memory(cell, c, T, B, I, H, args.device, args.dtype) / 2**20, 1)
            rows.append(row)

    memory_lines = []
    if not (args.no_memory or args.smoke):
        for cell, (T, B, I, H) in MEMORY[args.device]:
            if cell not in cells:
                continue
            mb = {c: peak_memory(cell, c, T, B, I, H, args.device, args.dtype) / 2**20 for c in mem_cands}
            memory_lines.append(f"{cell} T={T} B={B} I={I} H={H} fwd+bwd peak memory growth: " + ", ".join(
                f"{c} {mb[c]:.0f} MB" + ("" if c == "torch.nn" else f" ({mb[c] / mb['torch.nn']:.2f})")
                for c in mem_cands))

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{args.device}-{args.dtype}" + ("-smoke" if args.smoke else "-full" if args.full
                                                                  else ""))
    header = (f"rnnext benchmark: {machine(args.device)}; torch {torch.__version__}; commit {commit()}; "
              f"{datetime.date.today()}; ratio = time / torch.nn time (same run), < 1 is faster; of mm = rnnext "
              f"GFLOP/s / torch.mm 2048^3's {rate:.1f} GFLOP/s in {args.dtype} (same run)")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(stem + ".csv", "w", newline="") as f:
        f.write(f"# {header}\n")
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    table += "".join("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |\n" for r in rows)
    summary = []
    for c in (c for c in cands if c.startswith("rnnext")):
        for mode in MODES:
            for cell in cells:
                ratios = [r[f"{c}/torch.nn"] for r in rows if r["cell"] == cell and r["mode"] == mode]
                summary.append(f"{cell} {mode}: geometric-mean {c}/torch.nn = "
                               f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f} over {len(ratios)} configs")
    text = f"{header}\n\n{table}\n" + "\n".join(f"- {s}" for s in summary + memory_lines) + "\n"
    with open(stem + ".md", "w") as f:
        f.write(text)
    plot(rows, cells, stem + ".png", header)
    print(f"\nwrote {stem}.csv, .md, .png\n")
    print(text)
    return rows


def plot(rows, cells, path, title):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 4), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        mine = [r for r in rows if r["cell"] == cell]
        labels = sorted({f"{r['T']},{r['B']},{r['I']},{r['H']}" for r in mine},
                        key=lambda s: [int(v) for v in s.split(",")])
        width = 0.8 / len(MODES)
        for i, mode in enumerate(MODES):
            vals = {f"{r['T']},{r['B']},{r['I']},{r['H']}": r["rnnext/torch.nn"] for r in mine if r["mode"] == mode}
            ax.bar([k + width * i for k in range(len(labels))], [vals[lab] for lab in labels], width=width, label=mode)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(labels))], labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(cell.upper())
        ax.set_ylabel("rnnext time / torch.nn time")
        ax.legend()
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
