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



def test_sequence_logps_masks_prompt_and_padding():
    from caig_ray.losses import sequence_logps

    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    ids = torch.tensor([[1, 2, 3, 4, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 0]])  # response = tokens 2 and 3, token 4 is padding
    lp = torch.log_softmax(logits, -1)
    expected = lp[0, 1, 3] + lp[0, 2, 4]
    assert sequence_logps(logits, ids, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_dpo_loss_and_trl_metrics_by_hand():
    from caig_ray.losses import dpo_pcpo_loss, preference_loss

    pi_c, pi_r = torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -6.0])
    ref_c, ref_r = torch.tensor([-5.5, -6.5]), torch.tensor([-5.5, -6.5])
    beta = 0.5
    loss, m = preference_loss(pi_c, pi_r, ref_c, ref_r, beta)
    cr = beta * (pi_c - ref_c)  # [0.25, -0.25]
    rr = beta * (pi_r - ref_r)  # [-0.25, 0.25]
    expected = -torch.nn.functional.logsigmoid(cr - rr).mean()
    assert loss.item() == pytest.approx(expected.item())
    assert m["rewards/chosen"] == pytest.approx(0.0) and m["rewards/margins"] == pytest.approx(0.0)
    assert m["rewards/accuracies"] == 0.5  # strict >: one of two
    assert m["logps/chosen"] == pytest.approx(-6.0) and m["logps/rejected"] == pytest.approx(-6.0)
    tie, mt = preference_loss(pi_c, pi_c, ref_c, ref_c, beta)
    assert mt["rewards/accuracies"] == 0.0 and tie.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    total, mm = dpo_pcpo_loss((pi_c, pi_r, ref_c, ref_r), (pi_c, pi_c - 1, ref_c, ref_c), beta, pcpo_weight=1.0)
    pcpo = -torch.nn.functional.logsigmoid(torch.tensor(0.5)).item()
    assert total.item() == pytest.approx(expected.item() + pcpo)
    assert mm["pcpo/rewards/accuracies"] == 1.0 and "dpo/loss" in mm


def test_pcpo_negatives():
    import numpy as np
    from PIL import Image

    from caig_ray.pcpo import mask_patches, pcpo_negative

    img = Image.new("RGB", (128, 128), (200, 100, 50))
    masked = np.asarray(mask_patches(img, np.random.default_rng(0)))
    zero_patches = sum(masked[r:r + 32, c:c + 32].max() == 0 for r in range(0, 128, 32) for c in range(0, 128, 32))
    assert zero_patches == 12  # 75% of 16
    kinds = [pcpo_negative(0, [img, img], ["i0", "i1"], ["y0", "y1"], np.random.default_rng(s))["kind"]
             for s in range(40)]
    assert 10 < kinds.count("masked_image") < 30
    neg = next(pcpo_negative(0, [img, img], ["i0", "i1"], ["y0", "y1"], np.random.default_rng(s))
               for s in range(40) if kinds[s] == "other_caption")
    assert neg["instruction"] == "i1" and neg["response"] == "y1" and neg["image"] is img
    assert pcpo_negative(0, [img], ["i0"], ["y0"], np.random.default_rng(1))["kind"] == "masked_image"
