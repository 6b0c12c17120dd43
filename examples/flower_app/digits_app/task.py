"""digits_app: the model, the data and the training loop (nothing gradpress here).

scikit-learn's bundled digits (8x8 images, 10 classes; no download), a quarter held out for
the server's evaluation, the rest split evenly (IID) over the partitions; a 64-64-10 MLP.
"""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """A 64-64-10 MLP: four arrays in its state_dict."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = len(y) // 4
    return (torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y),
            order[n_test:], order[:n_test])


def load_data(partition_id: int, num_partitions: int, batch_size: int
              ) -> tuple[DataLoader, DataLoader]:
    """This partition's train and validation loaders (80/20 of its share)."""
    x, y, train_idx, _ = _digits()
    part = np.array_split(train_idx, num_partitions)[partition_id]
    cut = int(0.8 * len(part))
    train = TensorDataset(x[part[:cut]], y[part[:cut]])
    val = TensorDataset(x[part[cut:]], y[part[cut:]])
    gen = torch.Generator().manual_seed(partition_id)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
            DataLoader(val, batch_size=batch_size))


def load_centralized_dataset() -> DataLoader:
    """The held-out quarter, for the server's evaluation."""
    x, y, _, test_idx = _digits()
    return DataLoader(TensorDataset(x[test_idx], y[test_idx]), batch_size=256)


def train(net: Net, loader: DataLoader, epochs: int, lr: float) -> float:
    """Local SGD; returns the mean training loss."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    losses = []
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(xb), yb)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return float(np.mean(losses))


def test(net: Net, loader: DataLoader) -> tuple[float, float]:
    """(mean loss, accuracy) on ``loader``."""
    net.eval()
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for xb, yb in loader:
            out = net(xb)
            loss += nn.functional.cross_entropy(out, yb, reduction="sum").item()
            correct += int((out.argmax(1) == yb).sum())
            n += len(yb)
    return loss / n, correct / n
