"""Train a small classifier on a synthetic 100:1 imbalanced problem, with and without dynamic
class weights, and compare the minority classes' recall.

    python examples/imbalanced_classification.py

The weighted run replaces the usual recipe

    counts = torch.bincount(y, minlength=C)
    w = 1.0 / (counts + 1.0)
    loss = (F.cross_entropy(logits, y, reduction="none") * w[y]).mean()

(a host sync in bincount and several passes over the logits) by one fused call.
"""

import torch

import fused_wloss

NUM_CLASSES = 10
FEATURES = 16


def make_data(n, gen):
    # class k is drawn with probability proportional to 100 ** (-k / 9): from 1 down to 1/100
    p = torch.tensor([100.0 ** (-k / (NUM_CLASSES - 1)) for k in range(NUM_CLASSES)])
    y = torch.multinomial(p, n, replacement=True, generator=gen)
    centers = torch.randn(NUM_CLASSES, FEATURES, generator=gen) * 1.2
    x = centers[y] + torch.randn(n, FEATURES, generator=gen)
    return x, y


def train(class_weighting, x, y, steps=300, batch=256, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, NUM_CLASSES))
    criterion = fused_wloss.CrossEntropyLoss(class_weighting=class_weighting, reduction="sample_mean")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        loss = criterion(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def recall_per_class(model, x, y):
    with torch.no_grad():
        pred = model(x).argmax(1)
    return torch.stack([(pred[y == c] == c).float().mean() for c in range(NUM_CLASSES)])


def main():
    gen = torch.Generator().manual_seed(0)
    x_train, y_train = make_data(20000, gen)
    x_test, y_test = make_data(20000, gen)
    print(f"fused_wloss backend: {fused_wloss.backend()}; class counts: {torch.bincount(y_train).tolist()}")
    for weighting in (None, "inverse"):
        recall = recall_per_class(train(weighting, x_train, y_train), x_test, y_test)
        print(f"class_weighting={weighting!s:8} recall of the 3 rarest classes: "
              f"{[round(r, 3) for r in recall[-3:].tolist()]}, mean recall {recall.mean():.3f}")


if __name__ == "__main__":
    main()
