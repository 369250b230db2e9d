"""Image-only CTR baseline in the role of the paper's VAM / CG4CTR: a small CNN scores each ad,
P(left better) = sigmoid(f(left) - f(right)), trained with BCE on the same pairs as the RM."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


class AdCNN(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(2 * width, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def to_tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images])).permute(0, 3, 1, 2)


def train_pair_cnn(left: torch.Tensor, right: torch.Tensor, labels: torch.Tensor, epochs: int = 10,
                   lr: float = 3e-3, batch_size: int = 64, seed: int = 0, progress: bool = True) -> AdCNN:
    """``labels``: 0 = left better. Returns the trained CNN."""
    torch.manual_seed(seed)
    model = AdCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    target = (labels == 0).float()
    for _ in tqdm(range(epochs), desc="cnn baseline", disable=not progress):
        perm = torch.randperm(len(labels))
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            logit = model(left[idx]) - model(right[idx])
            loss = nn.functional.binary_cross_entropy_with_logits(logit, target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def cnn_p_left(model: AdCNN, left: torch.Tensor, right: torch.Tensor) -> np.ndarray:
    return torch.sigmoid(model(left) - model(right)).numpy()
