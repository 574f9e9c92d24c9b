"""The small digits classifier whose features `quality.py` compares (a Frechet distance, as FID
does with Inception features, Heusel et al. 2017, arXiv 1706.08500).

    python benchmarks/digits_classifier.py      # trains it, writes benchmarks/digits_classifier.pt

Trained on the digits training split only; its accuracy on the test split is printed and
stored beside the weights. The weights are small and shipped, so quality.py needs no training.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

WEIGHTS = Path(__file__).with_name("digits_classifier.pt")


class DigitsClassifier(torch.nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool, a 64-unit feature layer, 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32 * 4 * 4, 64)
        self.out = torch.nn.Linear(64, 10)

    def features(self, x):
        """x: (N, 1, 8, 8) in [0, 1] -> (N, 64) the layer before the logits."""
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x):
        return self.out(self.features(x))


def load_classifier():
    state = torch.load(WEIGHTS, weights_only=True)
    net = DigitsClassifier()
    net.load_state_dict(state["model"])
    return net.eval(), state["test_accuracy"]


def main():
    common.seed_everything(0)
    train, test = common.load_dataset("digits", "train"), common.load_dataset("digits", "test")
    x, y = train.data.float() / 16, train.labels
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    for step in range(3000):
        i = torch.randint(len(x), (64,), generator=g)
        xb = x[i]
        # shifts of one pixel make the features less sensitive to exact placement
        dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
        xb = torch.roll(xb, (dy, dx), (2, 3))
        loss = F.cross_entropy(net(xb), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(test.data.float() / 16).argmax(1) == test.labels).float().mean().item()
    torch.save({"model": net.state_dict(), "test_accuracy": acc}, WEIGHTS)
    print(f"test accuracy {acc:.4f}; wrote {WEIGHTS}")


if __name__ == "__main__":
    main()
