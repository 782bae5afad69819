"""Smoke check of a fresh build: a bad call whose error message holds integers must raise a Python
RuntimeError, not kill the process. A toolchain whose C++ runtime differs from torch's once built an
extension that crashed (SIGSEGV) on exactly this. Each device runs in its own subprocess so a crash is
reported by name.

    python tools/smoke.py                 # cpu, and cuda when a GPU is visible
    python tools/smoke.py --device cuda
"""
import argparse
import signal
import subprocess
import sys

CHILD = """
import torch, rnnext
assert rnnext.ops.LOAD_ERROR is None, rnnext.ops.LOAD_ERROR
x = torch.randn(4, 3, 6, device={device!r})
try:
    torch.ops.rnnext.lstm_seq(x, x.new_zeros(20, 6), x.new_zeros(20, 5), None, None, x.new_zeros(2, 5),
                              x.new_zeros(1, 3, 5), None, None)
except RuntimeError as e:
    assert "expected h0 of shape [3, 5], got [2, 5]" in str(e), str(e)
    print("raised:", e)
else:
    raise SystemExit("no error raised")
"""


def check(device):
    out = subprocess.run([sys.executable, "-c", CHILD.format(device=device)], capture_output=True, text=True,
                         timeout=300)
    if out.returncode < 0:
        return f"{device}: CRASHED ({signal.Signals(-out.returncode).name})", False
    if out.returncode != 0:
        return f"{device}: FAILED (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}", False
    return f"{device}: ok ({out.stdout.strip()})", True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", action="append", choices=["cpu", "cuda"])
    args = p.parse_args()
    devices = args.device
    if not devices:
        import torch
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ok = True
    for device in devices:
        line, passed = check(device)
        print(f"smoke {line}")
        ok &= passed
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
