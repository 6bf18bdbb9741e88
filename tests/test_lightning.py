"""examples/lightning_imbalanced.py under a real lightning.Trainer on the CPU: the loss falls, the
dynamic weights raise the recall of the rarest classes over the unweighted loss from the same seed,
the logged batch weights are the formula of the logged counts, and the loss step compiles with
fullgraph=True (inductor) with the same values and gradients as eager.

Runs are bounded (a few hundred steps of a small MLP); Lightning writes its logs under tmp_path.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import pathlib
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "lightning_imbalanced.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("lightning_imbalanced", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture(autouse=True)
def quiet_lightning():
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # data loader worker count, the absent tensorboard: advice, not errors
        warnings.simplefilter("ignore")
        yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


@pytest.fixture(scope="module")
def data():
    return {
        "multiclass": (example.make_multiclass(20000, seed=0), example.make_multiclass(20000, seed=1)),
        "multilabel": (example.make_multilabel(20000, seed=0), example.make_multilabel(20000, seed=1)),
    }


class LossHistory(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())


def _fit(task, class_weighting, steps, train_set, root, compile_backend=None, log_stats=False):
    L.seed_everything(0, verbose=False)
    model = example.ImbalancedClassifier(task, class_weighting, compile_backend=compile_backend, log_stats=log_stats)
    history = LossHistory()
    logger = CSVLogger(str(root), name="logs") if log_stats else False
    trainer = example.make_trainer(steps, str(root), progress=False, logger=logger, callbacks=[history])
    trainer.fit(model, example.train_loader(train_set, seed=0))
    assert trainer.global_step == steps
    return model, trainer, torch.stack(history.losses)


def _rare_recall(model, test_set):
    return example.recall(model, test_set)[-3:].mean().item()


@pytest.mark.parametrize("task,weighted", [("multiclass", "inverse"), ("multilabel", "balanced")])
def test_weighting_raises_recall_of_rare_classes(tmp_path, data, task, weighted):
    train_set, test_set = data[task]
    steps = 150
    plain, _, plain_losses = _fit(task, None, steps, train_set, tmp_path / "plain")
    model, trainer, losses = _fit(task, weighted, steps, train_set, tmp_path / "weighted", log_stats=True)

    for name, series in (("unweighted", plain_losses), ("weighted", losses)):
        assert torch.isfinite(series).all(), name
        first, last = series[:10].mean().item(), series[-25:].mean().item()
        assert last < 0.6 * first, f"{name}: the loss did not fall enough ({first:.4g} -> {last:.4g})"

    got, base = _rare_recall(model, test_set), _rare_recall(plain, test_set)
    assert got > base + 0.03, f"{task}: rarest recall {got:.3f} with {weighted} vs {base:.3f} unweighted"

    # the batch weights were logged, and each logged weight is the formula of the logged count
    prefix = "class/" if task == "multiclass" else "label/"
    assert "train_loss" in trainer.logged_metrics
    metrics = list(pathlib.Path(trainer.logger.log_dir).glob("metrics.csv"))
    assert metrics, "the CSV logger wrote no metrics"
    with open(metrics[0]) as f:
        rows = [r for r in csv.DictReader(f) if r.get(prefix + "normalizer")]
    assert rows, "no step logged the batch statistics"
    last_class = example.NUM_CLASSES - 1 if task == "multiclass" else example.NUM_LABELS - 1
    for row in rows:
        if task == "multiclass":
            count, weight = float(row[f"class/count/{last_class}"]), float(row[f"class/weight/{last_class}"])
            assert weight == pytest.approx(1.0 / (count + 1.0), rel=1e-5)
            assert float(row["class/normalizer"]) == 256  # sample_mean: the batch's non-ignored samples
        else:
            pos, neg = float(row[f"label/pos_count/{last_class}"]), float(row[f"label/neg_count/{last_class}"])
            assert pos + neg == 256
            assert float(row[f"label/pos_weight/{last_class}"]) == pytest.approx(1.0 / (pos + 1.0), rel=1e-5)
            assert float(row[f"label/neg_weight/{last_class}"]) == pytest.approx(1.0 / (neg + 1.0), rel=1e-5)


@pytest.mark.parametrize("task,weighted,backend", [
    ("multiclass", "inverse", "inductor"),
    ("multilabel", "balanced", "aot_eager"),
])
def test_training_step_compiles_fullgraph(tmp_path, data, task, weighted, backend):
    """The loss step (network, fused loss with the batch's own weights, stats) in one graph:
    torch.compile(fullgraph=True) raises on any graph break, so this also shows no host sync."""
    train_set, _ = data[task]
    torch._dynamo.reset()
    L.seed_everything(0, verbose=False)
    model = example.ImbalancedClassifier(task, weighted, compile_backend=backend)
    x, y = train_set.tensors[0][:256], train_set.tensors[1][:256]

    eager_loss, eager_stats = model.loss_and_stats(x, y)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    got_loss, got_stats = model._loss_step(x, y)
    got_grads = torch.autograd.grad(got_loss, list(model.parameters()))
    torch.testing.assert_close(got_loss, eager_loss)
    for got, want in zip(got_stats, eager_stats):
        torch.testing.assert_close(got, want)
    for got, want in zip(got_grads, eager_grads):
        torch.testing.assert_close(got, want)

    # and inside the Trainer: the same trajectory as the eager step from the same seed
    steps = 30
    _, _, compiled_losses = _fit(task, weighted, steps, train_set, tmp_path / "compiled", compile_backend=backend)
    _, _, eager_losses = _fit(task, weighted, steps, train_set, tmp_path / "eager")
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-3, atol=1e-5)
