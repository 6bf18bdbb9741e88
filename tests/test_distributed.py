"""BatchWeighting(sync=True) across 2 processes (gloo, CPU) under a real DistributedDataParallel.

Each case builds one global batch (the same on both ranks, from a seed), gives each rank a slice of
it (uneven, one rank's slice lacking classes, or empty), trains one step of a DDP-wrapped linear
layer with the synchronised loss, and compares the gradient DDP averaged with the gradient of the
same loss with ``sync=False`` on the whole global batch in one process. It also checks that the
mean of the ranks' losses is the global loss and that the returned stats are the global ones.

All cases run in one pair of processes (spawning costs seconds); each writes its outcome to a file
that a parametrized test reads, so a failure names its case. The process group has a timeout: a
rank that skipped a collective fails the case instead of hanging the suite.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist

import fused_wloss
from fused_wloss import BatchWeighting

WORLD = 2
FEATURES = 6

# name: (loss, options of the loss call, how the global batch is split between the ranks)
CASES = {
    "ce-inverse-mean": ("ce", {"class_weighting": "inverse"}, "uneven"),
    "ce-inverse-sample_mean-ignored": ("ce", {"class_weighting": "inverse", "reduction": "sample_mean", "ignore": True}, "uneven"),
    "ce-effective-sum-smoothing-static": ("ce", {"class_weighting": "effective_number", "reduction": "sum", "label_smoothing": 0.2, "static": True}, "uneven"),
    "ce-inverse_sqrt-mean-sample_weight": ("ce", {"class_weighting": "inverse_sqrt", "sample_weight": True, "ignore": True}, "uneven"),
    "ce-inverse-mean-static-sample_weight-smoothing": ("ce", {"class_weighting": "inverse", "static": True, "sample_weight": True, "label_smoothing": 0.1}, "uneven"),
    "ce-kdim-mean": ("ce", {"class_weighting": "inverse", "kdim": True}, "uneven"),
    "ce-prob-target-mean": ("ce", {"class_weighting": "inverse", "prob": True}, "uneven"),
    "ce-none": ("ce", {"class_weighting": "inverse", "reduction": "none"}, "uneven"),
    "ce-float32": ("ce", {"class_weighting": "inverse", "dtype": torch.float32}, "uneven"),
    "ce-rank1-empty": ("ce", {"class_weighting": "inverse"}, "empty"),
    "ce-all-ignored": ("ce", {"class_weighting": "inverse", "all_ignored": True}, "uneven"),
    "ce-compiled": ("ce", {"class_weighting": "inverse", "ignore": True, "compile": True}, "uneven"),
    "ce-learned-class-weight-mean": ("ce", {"class_weighting": "inverse", "learned": True, "label_smoothing": 0.1}, "uneven"),
    "linear-ce-inverse-mean": ("ce", {"class_weighting": "inverse", "linear": True, "ignore": True}, "uneven"),
    "linear-ce-effective-sum-sample_weight": ("ce", {"class_weighting": "effective_number", "reduction": "sum", "sample_weight": True, "linear": True}, "uneven"),
    "linear-ce-compiled": ("ce", {"class_weighting": "inverse_sqrt", "linear": True, "compile": True}, "uneven"),
    "linear-ce-class-tiles": ("ce", {"class_weighting": "inverse", "linear": True, "ignore": True, "tiles": True, "label_smoothing": 0.1}, "uneven"),
    "ce-learned-class-weight-sum": ("ce", {"class_weighting": "inverse_sqrt", "learned": True, "reduction": "sum"}, "uneven"),
    "bce-inverse-mean": ("bce", {"class_weighting": "inverse"}, "uneven"),
    "bce-balanced-sum": ("bce", {"class_weighting": "balanced", "reduction": "sum"}, "uneven"),
    "bce-balanced-mean-pos_weight-sample_weight-static": ("bce", {"class_weighting": "balanced", "pos_weight": True, "sample_weight": True, "static": True}, "uneven"),
    "bce-single-logit": ("bce", {"class_weighting": "balanced", "single": True}, "uneven"),
    "bce-none": ("bce", {"class_weighting": "balanced", "reduction": "none"}, "uneven"),
    "bce-rank1-empty": ("bce", {"class_weighting": "balanced"}, "empty"),
    "bce-compiled": ("bce", {"class_weighting": "balanced", "compile": True}, "uneven"),
    "bce-learned-weight-mean": ("bce", {"class_weighting": "balanced", "learned": True, "pos_weight": True}, "uneven"),
}


def _spec(name: str, sync: bool) -> BatchWeighting:
    if name == "balanced":
        return BatchWeighting("inverse", balanced=True, sync=sync)
    return BatchWeighting(name, sync=sync)


def _global_batch(loss: str, opts: dict, dtype):
    """Features, targets and per-sample weights of the global batch; identical on every rank."""
    gen = torch.Generator().manual_seed(7)
    n, num_classes = 40, 5
    feats = torch.randn(n, 3, FEATURES, generator=gen, dtype=dtype) if opts.get("kdim") else torch.randn(n, FEATURES, generator=gen, dtype=dtype)
    if loss == "ce":
        # class c has probability proportional to 3^-c: the last classes are rare
        p = torch.tensor([3.0 ** -c for c in range(num_classes)])
        y = torch.multinomial(p, feats[..., 0].numel(), replacement=True, generator=gen).reshape(feats.shape[:-1])
        y[-6:] = torch.tensor([0, 1, 0, 1, 1, 0]).reshape(-1, *([1] * (y.dim() - 1)))  # rank 1 sees classes 0 and 1 only
        if opts.get("ignore"):
            y[::7] = -100
        if opts.get("all_ignored"):
            y[:] = -100
        if opts.get("prob"):
            y = torch.softmax(3 * torch.randn(*y.shape, num_classes, generator=gen, dtype=dtype), dim=-1)
            if opts.get("kdim"):
                y = y.movedim(-1, 1)
    else:
        labels = 1 if opts.get("single") else 4
        prevalence = torch.tensor([0.5, 0.2, 0.08, 0.03])[:labels]
        y = (torch.rand(n, labels, generator=gen) < prevalence).to(dtype)
        y[-6:] = 0.0  # rank 1's slice has no positive at all
        if opts.get("single"):
            y = y.squeeze(-1)
    sample_weight = torch.rand(n, 3, generator=gen, dtype=dtype) + 0.2 if opts.get("kdim") else torch.rand(n, generator=gen, dtype=dtype) + 0.2
    return feats, y, sample_weight


class _Net(torch.nn.Module):
    """A linear layer, and with ``learned`` a static class weight that is a parameter too (its
    gradient goes through the normaliser of "mean")."""

    def __init__(self, out: int, learned: bool):
        super().__init__()
        self.linear = torch.nn.Linear(FEATURES, out)
        self.class_weight = torch.nn.Parameter(torch.rand(out) + 0.5) if learned else None

    def forward(self, x, head_loss=None):
        # head_loss(x, weight, bias): the head and the loss fused (fused_wloss.linear_cross_entropy)
        if head_loss is not None:
            return head_loss(x, self.linear.weight, self.linear.bias)
        return self.linear(x)


def _model(loss: str, opts: dict, dtype) -> torch.nn.Module:
    torch.manual_seed(3)
    out = (1 if opts.get("single") else 4) if loss == "bce" else 5
    return _Net(out, bool(opts.get("learned"))).to(dtype)


def _logits(model, feats, opts):
    if opts.get("linear"):  # the loss runs inside the model's forward, on its head
        return lambda head_loss: model(feats, head_loss=head_loss)
    logits = model(feats)
    if opts.get("kdim"):
        logits = logits.movedim(-1, 1)  # (N, d, C) -> (N, C, d)
    if opts.get("single"):
        logits = logits.squeeze(-1)
    return logits


def _loss_fn(loss: str, opts: dict, sync: bool, dtype):
    gen = torch.Generator().manual_seed(11)
    extra = {}
    if opts.get("static"):
        size = 5 if loss == "ce" else 4
        extra["weight"] = torch.rand(size, generator=gen, dtype=dtype) + 0.5
    if opts.get("pos_weight"):
        extra["pos_weight"] = torch.rand(4, generator=gen, dtype=dtype) + 1.0
    if "label_smoothing" in opts:
        extra["label_smoothing"] = opts["label_smoothing"]
    reduction = opts.get("reduction", "mean")
    weighting = _spec(opts["class_weighting"], sync)
    fn = fused_wloss.cross_entropy if loss == "ce" else fused_wloss.binary_cross_entropy_with_logits

    if opts.get("linear"):
        def head_loss(x, w, b, target, sample_weight):
            return fused_wloss.linear_cross_entropy(
                x, w, target, linear_bias=b, reduction=reduction, class_weighting=weighting,
                sample_weight=sample_weight, return_stats=True, chunk_size=(7, 2) if opts.get("tiles") else 7,
                **extra)

        if opts.get("compile") and sync:  # the loss inside DDP's forward, which itself is not traced
            torch._dynamo.reset()
            head_loss = torch.compile(head_loss, fullgraph=True, backend="aot_eager")
        return lambda run_model, target, sample_weight, _learned=None: run_model(
            lambda x, w, b: head_loss(x, w, b, target, sample_weight))

    def loss_fn(logits, target, sample_weight, learned_weight=None):
        kwargs = dict(extra) if learned_weight is None else {**extra, "weight": learned_weight}
        return fn(logits, target, reduction=reduction, class_weighting=weighting,
                  sample_weight=sample_weight, return_stats=True, **kwargs)

    if opts.get("compile") and sync:
        torch._dynamo.reset()
        return torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    return loss_fn


def _run_case(rank: int, loss: str, opts: dict, split: str) -> None:
    dtype = opts.get("dtype", torch.float64)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    feats, y, sw = _global_batch(loss, opts, dtype)
    n = feats.shape[0]
    cut = {"uneven": n - 6, "empty": n}[split]
    part = slice(0, cut) if rank == 0 else slice(cut, n)
    use_sw = sw if opts.get("sample_weight") else None
    reduction = opts.get("reduction", "mean")

    # the single-process loss on the global batch, without sync
    single = _model(loss, opts, dtype)
    expected, expected_stats = _loss_fn(loss, opts, False, dtype)(_logits(single, feats, opts), y, use_sw, single.class_weight)
    if reduction == "none":
        expected_sum = expected.sum()
        expected = expected[part]
    else:
        expected_sum = expected
    expected_sum.backward()

    ddp = torch.nn.parallel.DistributedDataParallel(_model(loss, opts, dtype))
    got, stats = _loss_fn(loss, opts, True, dtype)(
        _logits(ddp, feats[part], opts), y[part], None if use_sw is None else use_sw[part],
        ddp.module.class_weight,
    )
    if reduction == "none":
        # the elements are the global "none" loss's; their sum, times R, is this rank's share
        torch.testing.assert_close(got, expected, **tol, equal_nan=True)
        (got.sum() * WORLD).backward()
    else:
        mean_over_ranks = got.detach().clone()
        dist.all_reduce(mean_over_ranks)
        torch.testing.assert_close(mean_over_ranks / WORLD, expected.detach(), **tol, equal_nan=True)
        got.backward()
    for (name, p), want in zip(ddp.module.named_parameters(), (p.grad for p in single.parameters())):
        torch.testing.assert_close(p.grad, want, **tol, equal_nan=True, msg=lambda m: f"grad of {name}: {m}")
    for field, got_field, want_field in zip(stats._fields, stats, expected_stats):
        torch.testing.assert_close(got_field, want_field, **tol, msg=lambda m: f"stats.{field}: {m}")
    if opts.get("all_ignored"):
        assert torch.isnan(got), "a global batch whose targets are all ignored has a NaN mean, as torch"


def _check_unsynced_differs(rank: int) -> str:
    """The same DDP step with sync=False does not give the global gradient: the comparison above
    can fail."""
    loss, opts, _ = CASES["ce-inverse-mean"]
    dtype = torch.float64
    feats, y, _sw = _global_batch(loss, opts, dtype)
    part = slice(0, 34) if rank == 0 else slice(34, 40)
    single = _model(loss, opts, dtype)
    _loss_fn(loss, opts, False, dtype)(_logits(single, feats, opts), y, None)[0].backward()
    ddp = torch.nn.parallel.DistributedDataParallel(_model(loss, opts, dtype))
    _loss_fn(loss, opts, False, dtype)(_logits(ddp, feats[part], opts), y[part], None)[0].backward()
    diff = (ddp.module.linear.weight.grad - single.linear.weight.grad).abs().max().item()
    return "ok" if diff > 1e-3 else f"local weights gave the global gradient (max diff {diff})"


def _check_sample_weight_grad_refused(rank: int) -> str:
    """Refused before the collective, on every rank alike: an error, not a hang."""
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    sw = torch.rand(4, requires_grad=True)
    try:
        fused_wloss.cross_entropy(x, y, sample_weight=sw, class_weighting=BatchWeighting("inverse", sync=True))
    except ValueError as e:
        return "ok" if "sample_weight must not require grad" in str(e) else f"wrong message: {e}"
    return "no error"


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a file rendezvous in the test's own directory: no TCP port to probe and then lose to
    # another process before the group binds it
    store = dist.FileStore(os.path.join(out_dir, "rendezvous"), WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, (loss, opts, split) in CASES.items():
            try:
                _run_case(rank, loss, opts, split)
                results[name] = "ok"
            except Exception:  # recorded, and the other cases still run
                results[name] = traceback.format_exc()
            dist.barrier()
        for name, check in (("unsynced-differs", _check_unsynced_differs),
                            ("sample-weight-grad-refused", _check_sample_weight_grad_refused)):
            try:
                results[name] = check(rank)
            except Exception:
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
    # The outcome is on disk; leave without the interpreter's finalization. There, torch's own
    # teardown of the gloo backend now and then destroys a still-joinable C++ thread, and the
    # process aborts ("terminate called without an active exception") after every case passed:
    # seen once in a clean-clone CI run and once in 25 runs of this module, always after both
    # ranks had written all-"ok" results. A case that fails, hangs or crashes still shows: in its
    # result, through the group's timeout, or as a missing results file.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    torch.multiprocessing.spawn(_worker, args=(out_dir,), nprocs=WORLD, join=True)
    per_rank = []
    for rank in range(WORLD):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            per_rank.append(json.load(f))
    return per_rank


@pytest.mark.parametrize("case", list(CASES) + ["unsynced-differs", "sample-weight-grad-refused"])
def test_ddp_gradient_equals_single_process_on_global_batch(outcomes, case):
    for rank, results in enumerate(outcomes):
        assert results.get(case) == "ok", f"rank {rank}: {results.get(case, 'did not run')}"


def test_sync_without_process_group_counts_locally():
    """No initialised process group: sync=True is the local computation (one process, no hang)."""
    assert not dist.is_initialized()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=gen), torch.randint(0, 4, (12,), generator=gen)
    synced = fused_wloss.cross_entropy(x, y, class_weighting=BatchWeighting("inverse", sync=True))
    torch.testing.assert_close(synced, fused_wloss.cross_entropy(x, y, class_weighting="inverse"))


def test_batch_weighting_sync_arguments():
    with pytest.raises(ValueError, match="process_group.*sync=True"):
        BatchWeighting("inverse", process_group=object())
    with pytest.raises(TypeError, match="sync must be a bool"):
        BatchWeighting("inverse", sync=1)
    group = object()  # a stand-in handle: it is neither compared nor copied
    spec = BatchWeighting("inverse", sync=True, process_group=group)
    assert spec == BatchWeighting("inverse", sync=True) and hash(spec) == hash(BatchWeighting("inverse", sync=True))
    assert spec != BatchWeighting("inverse")
    import copy

    assert copy.deepcopy(spec).process_group is group
    assert "process_group" not in repr(spec)
