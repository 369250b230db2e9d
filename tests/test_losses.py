import math

import pytest
import torch

from caig_ray.losses import rm_loss


def test_rm_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    ctr_pred = torch.tensor([[0.02, 0.01], [0.03, 0.05]])
    ctr_true = torch.tensor([[0.03, 0.01], [0.03, 0.02]])
    ce = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.e))) / 2
    mse = (0.01**2 + 0 + 0 + 0.03**2) / 4
    loss, m = rm_loss(logits, ctr_pred, labels, ctr_true, ctr_weight=0.5)
    assert loss.item() == pytest.approx(ce + 0.5 * mse)
    assert m["rm/accuracy"] == 0.5 and m["rm/ce"] == pytest.approx(ce)
    # scaled target: CTR in percent
    _, m100 = rm_loss(logits, ctr_pred * 100, labels, ctr_true, ctr_weight=0.5, ctr_scale=100.0)
    assert m100["rm/mse"] == pytest.approx(mse * 1e4, rel=1e-4)

