"""Deployment beyond ONNX (tests/test_onnx.py): torch.export keeps the fused ops, FSDP2 trains them, TorchScript
traces them (and refuses to script them, clearly), rnnext.to_torch gives torch.nn's layers back, and README's
"Deploying" commands run (AOTInductor among them)."""
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import rnnext
from conftest import close

I, H = 3, 4


class Stack(nn.Module):
    """One of each fused layer kind and a cell, on x [T, B, I]; every output, flat."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = rnnext.LSTM(I, H, 2, bidirectional=True)
        self.gru = rnnext.GRU(I, H, batch_first=True)
        self.rnn = rnnext.RNN(I, H, nonlinearity="relu")
        self.mgru = rnnext.MinimalGRU(I, H)
        self.lnlstm = rnnext.LayerNormLSTM(I, H, zoneout=0.1)
        self.cell = rnnext.GRUCell(I, H)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        outs = [y, h, c, *self.gru(x.transpose(0, 1)), *self.rnn(x), *self.mgru(x)]
        y, (h, c) = self.lnlstm(x)
        return (*outs, y, h, c, self.cell(x[0]))


FUSED_OPS = {"lstm_seq", "gru_seq", "rnn_relu_seq", "minimal_gru_seq", "layernorm_lstm_seq", "gru_cell"}


def _inputs(T=5, B=2, seed=0):
    return torch.randn(T, B, I, generator=torch.Generator().manual_seed(seed))


def test_torch_export_keeps_the_fused_ops():
    """torch.export.export: the graph calls torch.ops.rnnext.* (one per layer-direction), and the exported
    program's module gives the eager outputs."""
    model = Stack().eval()
    ep = torch.export.export(model, (_inputs(),))
    ops = [n.target.name().split("::")[1].split(".")[0] for n in ep.graph.nodes if n.op == "call_function"
           and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "rnnext"]
    assert sorted(set(ops)) == sorted(FUSED_OPS)
    assert ops.count("lstm_seq") == 4
    x = _inputs(seed=1)
    for got, want in zip(ep.module()(x), model(x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_jit_trace_passes_its_check_and_reruns(tmp_path):
    """torch.jit.trace's own check (re-trace under no_grad, compare graphs and outputs) passes; the traced module,
    and its torch.jit.save/load copy, give the eager outputs on a new input of the same shape; trained through,
    the traced module's gradients are the eager ones."""
    model = Stack().eval()
    traced = torch.jit.trace(model, (_inputs(),))  # check_trace=True
    x = _inputs(seed=1)
    want = model(x)
    torch.jit.save(traced, tmp_path / "traced.pt")
    loaded = torch.jit.load(tmp_path / "traced.pt")
    for module in (traced, loaded):
        for got, w in zip(module(x), want, strict=True):
            torch.testing.assert_close(got, w, rtol=0, atol=0)
    grads = []
    for module in (model, traced):
        model.zero_grad()
        sum(o.square().sum() for o in module(x)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g, w in zip(*grads, strict=True):
        torch.testing.assert_close(g, w)


def test_jit_trace_under_no_grad():
    """A trace taken under torch.no_grad passes its check too and reruns."""
    model = Stack().eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, (_inputs(),))
        x = _inputs(seed=2)
        for got, want in zip(traced(x), model(x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: rnnext.LSTM(I, H), lambda: rnnext.LayerNormGRU(I, H),
                                  lambda: rnnext.MinimalGRUCell(I, H), lambda: rnnext.LSTMCell(I, H),
                                  lambda: nn.Sequential(nn.Linear(I, I), rnnext.GRU(I, H))],
                         ids=["LSTM", "LayerNormGRU", "MinimalGRUCell", "LSTMCell", "inside_a_model"])
def test_jit_script_says_to_trace_or_export(make):
    """torch.jit.script of an rnnext module, or of a model holding one: one RuntimeError naming the module and
    pointing to torch.jit.trace, torch.export and rnnext.to_torch; the model is left as it was."""
    model = make()
    before = [type(m) for m in model.modules()]
    name = type(model[1] if isinstance(model, nn.Sequential) else model).__name__
    with pytest.raises(RuntimeError, match=rf"rnnext\.{name} does not support torch\.jit\.script; use torch\.jit\.trace"
                                           r".*torch\.export\.export.*rnnext\.to_torch"):
        torch.jit.script(model)
    assert [type(m) for m in model.modules()] == before


# ---- to_torch --------------------------------------------------------------------------------------------

TORCH_EQUIVALENT = {
    "lstm": (lambda: rnnext.LSTM(I, H, 2, bidirectional=True, proj_size=2, batch_first=True), nn.LSTM),
    "gru": (lambda: rnnext.GRU(I, H, bias=False, dropout=0.0), nn.GRU),
    "rnn_relu": (lambda: rnnext.RNN(I, H, 2, nonlinearity="relu"), nn.RNN),
    "lstm_cell": (lambda: rnnext.LSTMCell(I, H), nn.LSTMCell),
    "gru_cell": (lambda: rnnext.GRUCell(I, H), nn.GRUCell),
    "rnn_cell_relu": (lambda: rnnext.RNNCell(I, H, nonlinearity="relu"), nn.RNNCell),
}


def _run(module, x):
    if isinstance(module, nn.RNNCellBase):
        x = x[0]
    elif module.batch_first:
        x = x.transpose(0, 1)
    out = module(x)
    return [out[0], *out[1]] if isinstance(out, tuple) and isinstance(out[1], tuple) else \
        list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("kind", sorted(TORCH_EQUIVALENT))
def test_to_torch_shares_parameters_and_outputs(kind):
    """rnnext.to_torch swaps each layer inside a model for torch.nn's, in place, with the very same Parameter
    objects (an optimizer built before steps the new module), the same options and outputs (fp64, 1e-10), and
    rnnext.convert swaps it back."""
    make, cls = TORCH_EQUIVALENT[kind]
    ours = make().double()
    model = nn.Sequential(ours)
    params = list(ours.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = _inputs().double()
    want = _run(ours, x)
    assert rnnext.to_torch(model) is model
    theirs = model[0]
    assert type(theirs) is cls
    assert [id(p) for p in theirs.parameters()] == [id(p) for p in params]
    options = {k: v for k, v in vars(ours).items() if not k.startswith("_") and k not in ("zoneout", "state_grad_clip")}
    assert {k: v for k, v in vars(theirs).items() if not k.startswith("_")} == options
    got = _run(theirs, x)
    for g, w in zip(got, want, strict=True):
        close(g, w, rtol=1e-10)
    before = params[0].detach().clone()
    sum(g.square().sum() for g in got).backward()
    opt.step()
    assert not torch.equal(next(theirs.parameters()), before)
    assert type(rnnext.convert(model)[0]) is type(ours)
    assert rnnext.to_torch(ours) is not ours and type(rnnext.to_torch(ours)) is cls  # the model itself: a new one


def test_to_torch_names_every_layer_without_equivalent_and_converts_nothing():
    """MinimalGRU(Cell), the LayerNorm layers and cells, zoneout, state_grad_clip: one ValueError naming each (by
    its name in the model), and no module of the model replaced."""
    model = nn.ModuleDict(dict(
        ok=rnnext.LSTM(I, H), mgru=rnnext.MinimalGRU(I, H), mcell=rnnext.MinimalGRUCell(I, H),
        ln=rnnext.LayerNormLSTM(I, H), lncell=rnnext.LayerNormGRUCell(I, H),
        zoned=rnnext.GRU(I, H, zoneout=0.1), zcell=rnnext.LSTMCell(I, H, zoneout=0.2),
        clipped=nn.Sequential(rnnext.RNN(I, H, state_grad_clip=1.0))))
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError) as err:
        rnnext.to_torch(model)
    message = str(err.value)
    for part in ("mgru (MinimalGRU)", "mcell (MinimalGRUCell)", "ln (LayerNormLSTM)", "lncell (LayerNormGRUCell)",
                 "zoned (GRU with zoneout=0.1)", "zcell (LSTMCell with zoneout=0.2)",
                 "clipped.0 (RNN with state_grad_clip=1.0)"):
        assert part in message
    assert " ok " not in message and "ok (" not in message
    assert [type(m) for m in model.modules()] == before


# ---- FSDP2 -------------------------------------------------------------------------------------------------

def _fsdp_worker(rank, world, init_file, steps, result_file):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)  # two processes on two cores
    torch.manual_seed(0)
    model = nn.Sequential(rnnext.LSTM(I, H, 2), rnnext.GRU(H, H))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 2 * world, I, generator=g)[:, rank * 2:(rank + 1) * 2]
        y, _ = model[1](model[0](x)[0])
        opt.zero_grad()
        y.square().mean().backward()
        opt.step()
    state = {k: v.full_tensor().detach() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(state, result_file)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as tests/test_hardening.py's DDP workers: no interpreter shutdown with gloo's thread alive


def test_fsdp2_two_processes_match_one(tmp_path):
    """FSDP2 (fully_shard per layer, gloo, 2 processes, each half the batch) trains to the parameters of one
    process on the whole batch (the mean loss's gradient is the mean of the halves'), every parameter moved."""
    import torch.multiprocessing as mp

    steps, world = 2, 2
    result = str(tmp_path / "fsdp.pt")
    mp.spawn(_fsdp_worker, args=(world, str(tmp_path / "init"), steps, result), nprocs=world, join=True)
    torch.manual_seed(0)
    model = nn.Sequential(rnnext.LSTM(I, H, 2), rnnext.GRU(H, H))
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        y, _ = model[1](model[0](torch.randn(5, 2 * world, I, generator=g))[0])
        opt.zero_grad()
        y.square().mean().backward()
        opt.step()
    got = torch.load(result)
    assert got.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert not torch.equal(v, init[k])  # trained
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


# ---- README --------------------------------------------------------------------------------------------------

# The "Deploying" section for README.md: test_readme_deploying_commands_run runs its python blocks, from README.md
# once the section is there, else from here.


def _deploying_blocks():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = re.search(r"^## Deploying\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, "README.md has no '## Deploying' section"
    return re.findall(r"```python\n(.*?)```", section.group(1), re.S)


def test_readme_deploying_commands_run(tmp_path, monkeypatch):
    """README's "Deploying" python blocks run in order in one namespace (files in a temporary directory): the ONNX
    model runs in onnxruntime at another shape, AOTInductor's package gives the eager outputs, the trace and the
    torch.nn copy run."""
    pytest.importorskip("onnxscript", reason="the README's ONNX export needs onnxscript (requirements.txt)")
    pytest.importorskip("onnxruntime", reason="the README runs the ONNX model in onnxruntime (requirements.txt)")
    blocks = _deploying_blocks()
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    ns = {}
    # Precompiled headers: a minute to build on a fresh machine, a cache hit only on the next run.
    with torch._inductor.config.patch({"aot_inductor.precompile_headers": False}):
        for block in blocks:
            exec(compile(block, "README.md", "exec"), ns)
    assert ns["y"].shape == (4, 10, 16)  # AOTInductor's
    assert isinstance(ns["plain"], nn.LSTM) and isinstance(ns["scripted"], torch.jit.ScriptModule)
    assert (tmp_path / "lstm.onnx").exists() and (tmp_path / "lstm.ts").exists()
