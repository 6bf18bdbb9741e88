"""Dynamic class weights in a PyTorch Lightning training loop, with the weights logged.

A LightningModule trained on synthetic, imbalanced data made in code:

- multi-class: 10 classes drawn 100:1 (from the most to the least frequent), softmax
  cross-entropy with ``class_weighting="inverse"`` (the weights ``1 / (n_c + 1)`` of each batch's
  own class counts, the loss averaged over the samples);
- multi-label (``--multilabel``): 8 labels whose prevalence falls from 30% to 0.3%, sigmoid
  cross-entropy with ``class_weighting="balanced"`` (each label's positives weighted
  ``1 / (n_pos + 1)`` and its negatives ``1 / (n_neg + 1)``).

Each run trains with and without the weights, from the same seed, and prints the recall of the
rarest classes. The training step logs the loss and, from ``return_stats=True``, the batch's counts
and weights (``self.log_dict``), with no second pass to recompute them.

    python examples/lightning_imbalanced.py
    python examples/lightning_imbalanced.py --multilabel
    python examples/lightning_imbalanced.py --compile            # loss step in torch.compile(fullgraph=True)
    python examples/lightning_imbalanced.py --devices 2          # DDP on CPU (gloo), counts summed over the ranks

With ``--devices 2`` the weighting is ``BatchWeighting(..., sync=True)``: both ranks weight with
the counts of the global batch, and the averaged gradient is the one-process gradient of that batch.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import fused_wloss

FEATURES = 16
NUM_CLASSES = 10
NUM_LABELS = 8


# ---- data ----------------------------------------------------------------------------------------

def make_multiclass(n: int, seed: int) -> TensorDataset:
    """Class k has probability proportional to 100 ** (-k / 9) (from 1 down to 1/100); the
    features are the class's centre plus unit noise. The centres depend only on ``seed // 1000``
    so that a training and a test set drawn with seeds 0 and 1 share them."""
    centres = torch.randn(NUM_CLASSES, FEATURES, generator=torch.Generator().manual_seed(seed // 1000)) * 1.2
    gen = torch.Generator().manual_seed(seed)
    p = torch.tensor([100.0 ** (-k / (NUM_CLASSES - 1)) for k in range(NUM_CLASSES)])
    y = torch.multinomial(p, n, replacement=True, generator=gen)
    x = centres[y] + torch.randn(n, FEATURES, generator=gen)
    return TensorDataset(x, y)


def make_multilabel(n: int, seed: int) -> TensorDataset:
    """Label l is on where a noisy linear score of the features passes the threshold that makes
    its prevalence 0.3 * 100 ** (-l / 7): from 30% down to 0.3%."""
    directions = torch.randn(FEATURES, NUM_LABELS, generator=torch.Generator().manual_seed(seed // 1000))
    directions = directions / directions.norm(dim=0)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=gen)
    score = x @ directions + 0.3 * torch.randn(n, NUM_LABELS, generator=gen)  # std sqrt(1 + 0.09)
    prevalence = torch.tensor([0.3 * 100.0 ** (-l / (NUM_LABELS - 1)) for l in range(NUM_LABELS)])
    threshold = torch.distributions.Normal(0.0, math.sqrt(1.09)).icdf(1.0 - prevalence)
    return TensorDataset(x, (score > threshold).float())


# ---- the LightningModule ---------------------------------------------------------------------------

class ImbalancedClassifier(L.LightningModule):
    """A small MLP trained with a fused_wloss criterion.

    Args:
        task: ``"multiclass"`` (softmax cross-entropy over ``NUM_CLASSES``) or ``"multilabel"``
            (sigmoid cross-entropy over ``NUM_LABELS``).
        class_weighting: passed to the criterion (None trains unweighted).
        sync: sum the class counts over the DDP process group (``BatchWeighting(sync=True)``).
        compile_backend: run :meth:`loss_and_stats` under ``torch.compile(fullgraph=True)`` with
            this backend (``"inductor"``, ``"aot_eager"``), or eagerly when None.
        log_stats: log the batch's counts and weights every step.
    """

    def __init__(
        self,
        task: str = "multiclass",
        class_weighting: Optional[str] = "inverse",
        lr: float = 1e-2,
        sync: bool = False,
        compile_backend: Optional[str] = None,
        log_stats: bool = True,
    ) -> None:
        super().__init__()
        if task not in ("multiclass", "multilabel"):
            raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")
        self.save_hyperparameters()
        outputs = NUM_CLASSES if task == "multiclass" else NUM_LABELS
        self.net = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, outputs)
        )
        weighting = class_weighting
        if sync and class_weighting is not None:
            scheme = "inverse" if class_weighting == "balanced" else class_weighting
            weighting = fused_wloss.BatchWeighting(scheme, balanced=class_weighting == "balanced", sync=True)
        if task == "multiclass":
            # "sample_mean": the weighted losses averaged over the samples (the usual recipe)
            self.criterion = fused_wloss.CrossEntropyLoss(class_weighting=weighting, reduction="sample_mean")
        else:
            self.criterion = fused_wloss.BCEWithLogitsLoss(class_weighting=weighting)
        self._loss_step = self.loss_and_stats
        if compile_backend is not None:
            self._loss_step = torch.compile(self.loss_and_stats, fullgraph=True, backend=compile_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss_and_stats(self, x: torch.Tensor, y: torch.Tensor):
        """Logits, the loss with this batch's weights, and what the weights were: the part of the
        training step that compiles (Lightning's logging stays outside the compiled region)."""
        return self.criterion(self.net(x), y, return_stats=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, stats = self._loss_step(x, y)
        # Under DDP with sync each rank's loss is its share scaled by the world size; the mean
        # over the ranks (sync_dist) is the loss of the global batch.
        self.log("train_loss", loss, sync_dist=self.hparams.sync)
        if self.hparams.log_stats:
            # counts and weights are already the group's with sync: no sync_dist needed
            prefix = "class/" if self.hparams.task == "multiclass" else "label/"
            self.log_dict(stats.to_dict(prefix), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


# ---- training and evaluation -----------------------------------------------------------------------

def make_trainer(steps: int, root_dir: Optional[str] = None, devices: int = 1, progress: bool = True,
                 logger=True, callbacks=None) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=logger,
        callbacks=callbacks,
        default_root_dir=root_dir,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        log_every_n_steps=10,
    )


def train_loader(dataset: TensorDataset, seed: int, batch_size: int = 256) -> DataLoader:
    # drop_last: every batch has the same shape, so a compiled step never recompiles
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def recall(model: ImbalancedClassifier, dataset: TensorDataset) -> torch.Tensor:
    """Recall of every class (multiclass: argmax) or label (multilabel: sigmoid > 0.5)."""
    x, y = dataset.tensors
    logits = model(x)
    if model.hparams.task == "multiclass":
        hit = torch.nn.functional.one_hot(logits.argmax(1), NUM_CLASSES).bool()
        positive = torch.nn.functional.one_hot(y, NUM_CLASSES).bool()
    else:
        hit, positive = logits > 0, y > 0.5
    return (hit & positive).sum(0) / positive.sum(0).clamp(min=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multilabel", action="store_true", help="the multi-label BCE variant")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--compile", action="store_true", help="compile the loss step (inductor, fullgraph)")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes; more than 1 runs DDP (gloo)")
    parser.add_argument("--root-dir", default="lightning_logs_example", help="where Lightning writes its logs")
    args = parser.parse_args()

    task = "multilabel" if args.multilabel else "multiclass"
    make = make_multilabel if args.multilabel else make_multiclass
    weighted = "balanced" if args.multilabel else "inverse"
    train_set, test_set = make(20000, seed=0), make(20000, seed=1)
    results = {}
    for class_weighting in (None, weighted):
        L.seed_everything(0, verbose=False)
        model = ImbalancedClassifier(task, class_weighting, sync=args.devices > 1,
                                     compile_backend="inductor" if args.compile else None)
        trainer = make_trainer(args.steps, args.root_dir, args.devices)
        trainer.fit(model, train_loader(train_set, seed=0))
        if trainer.is_global_zero:
            results[class_weighting] = recall(model, test_set)
    if results:
        print(f"fused_wloss backend: {fused_wloss.backend()}")
        for class_weighting, r in results.items():
            print(f"class_weighting={class_weighting!s:9} recall of the 3 rarest: "
                  f"{[round(v, 3) for v in r[-3:].tolist()]}, mean recall {r.mean():.3f}")


if __name__ == "__main__":
    main()
