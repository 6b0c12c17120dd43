"""The federated demo's task: scikit-learn's digits split across clients by a Dirichlet draw, a
small MLP as one flat float32 vector, and plain local SGD (no Flower needed).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


# -- data -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FederatedData:
    """Client partitions and a held-out test set of scikit-learn's digits (8x8, 10 classes)."""

    clients: list[tuple[np.ndarray, np.ndarray]]
    test: tuple[np.ndarray, np.ndarray]


def digits_partitions(num_clients: int, *, alpha: float = 0.5, test_fraction: float = 0.25,
                      min_size: int = 10, seed: int = 0) -> FederatedData:
    """Split digits non-iid: for every label, client shares drawn from ``Dirichlet(alpha)``.

    Small ``alpha`` gives each client few labels. Draws are repeated (seeded) until every
    client holds at least ``min_size`` training samples.
    """
    from sklearn.datasets import load_digits

    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    if len(train_idx) < num_clients * min_size:
        raise ValueError(f"{len(train_idx)} training samples cannot give {num_clients} "
                         f"clients {min_size} each; use fewer clients or a smaller min_size")
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in range(10):
            idx = train_idx[y[train_idx] == label]
            idx = idx[rng.permutation(len(idx))]
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(idx))
            for i, chunk in enumerate(np.split(idx, cuts.astype(int))):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        raise ValueError(f"no Dirichlet({alpha}) split gave every client {min_size} samples;"
                         " raise alpha or lower min_size")
    clients = [(x[np.sort(p)], y[np.sort(p)]) for p in parts]
    return FederatedData(clients, (x[test_idx], y[test_idx]))


# -- model: an MLP (or softmax regression) on a flat parameter vector -----------------------
def _shapes(hidden: int) -> list[tuple[int, ...]]:
    if hidden == 0:
        return [(64, 10), (10,)]
    return [(64, hidden), (hidden,), (hidden, 10), (10,)]


def num_params(hidden: int) -> int:
    """Length of the flat parameter vector of the 64-hidden-10 MLP (hidden=0: softmax)."""
    return sum(int(np.prod(s)) for s in _shapes(hidden))


def init_params(hidden: int, seed: int = 0) -> np.ndarray:
    """He-initialized weights, zero biases, as one float32 vector."""
    if hidden < 0:
        raise ValueError(f"hidden must be >= 0, got {hidden}")
    rng = np.random.default_rng(seed)
    parts = [rng.normal(0.0, np.sqrt(2.0 / s[0]), s).ravel() if len(s) == 2 else np.zeros(s)
             for s in _shapes(hidden)]
    return np.concatenate(parts).astype(np.float32)


def _logits(w: torch.Tensor, x: torch.Tensor, hidden: int) -> torch.Tensor:
    tensors, pos = [], 0
    for s in _shapes(hidden):
        n = int(np.prod(s))
        tensors.append(w[pos:pos + n].reshape(s))
        pos += n
    if hidden == 0:
        return x @ tensors[0] + tensors[1]
    h = torch.relu(x @ tensors[0] + tensors[1])
    return h @ tensors[2] + tensors[3]


def _hidden_of(w: np.ndarray | torch.Tensor) -> int:
    n = int(w.shape[0])
    if n == num_params(0):
        return 0
    hidden = (n - 10) // 75  # 64h + h + 10h + 10
    if num_params(hidden) != n:
        raise ValueError(f"{n} parameters is no 64-hidden-10 MLP")
    return hidden


def evaluate(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(cross-entropy, accuracy) of weights ``w`` on ``(x, y)``."""
    with torch.no_grad():
        yt = torch.tensor(y)
        logits = _logits(torch.tensor(w, dtype=torch.float32), torch.tensor(x), _hidden_of(w))
        loss = float(torch.nn.functional.cross_entropy(logits, yt))
        acc = float((logits.argmax(1) == yt).float().mean())
    return loss, acc


def local_train(w: np.ndarray, x: np.ndarray, y: np.ndarray, *, epochs: int = 1,
                lr: float = 0.1, batch_size: int = 16, seed: int = 0) -> tuple[np.ndarray, float]:
    """``epochs`` of minibatch SGD from ``w``; returns the new weights and the mean loss."""
    hidden = _hidden_of(w)
    wt = torch.tensor(np.asarray(w, np.float32), requires_grad=True)
    xt, yt = torch.tensor(x), torch.tensor(y)  # copies: arrays from Flower are read-only
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        for idx in torch.randperm(len(yt), generator=gen).split(batch_size):
            loss = torch.nn.functional.cross_entropy(_logits(wt, xt[idx], hidden), yt[idx])
            (grad,) = torch.autograd.grad(loss, wt)
            with torch.no_grad():
                wt -= lr * grad
            losses.append(float(loss.detach()))
    return wt.detach().numpy().copy(), float(np.mean(losses)) if losses else 0.0
