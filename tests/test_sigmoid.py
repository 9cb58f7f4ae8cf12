"""Sigmoid (SigLIP) contrastive loss, gathered and ring, against a single-process float64 full batch."""
import pytest
import torch
import torch.nn.functional as F

from mmpt.losses import contrastive_loss
from mmpt.bench.comm import CountBytes
from tests.distributed import run_distributed
from tests.test_contrastive import B_LOCAL, DIM, data

BIAS = -2.0


def reference(world: int):
    a, b, scale = (t.double().requires_grad_() for t in data(world))
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    logits = scale * a @ b.t() + bias
    labels = 2 * torch.eye(a.size(0), dtype=torch.float64) - 1
    loss = -F.logsigmoid(labels * logits).sum() / a.size(0)  # SigLIP: normalised by the batch size
    loss.backward()
    return loss.detach(), a.grad, b.grad, scale.grad, bias.grad


def rank_fn(rank: int, world: int, ring: bool, chunk):
    a, b, scale = data(world)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    a, b, scale = a[sl].clone().requires_grad_(), b[sl].clone().requires_grad_(), scale.clone().requires_grad_()
    bias = torch.tensor(BIAS, requires_grad=True)
    with CountBytes() as sent:
        loss, report = contrastive_loss(a, b, scale, kind="sigmoid", logit_bias=bias, ring=ring, chunk_size=chunk)
        loss.backward()
    return loss.detach(), a.grad, b.grad, scale.grad, bias.grad, report, sent.bytes


@pytest.mark.parametrize("world, ring, chunk", [(1, False, None), (2, False, None), (2, True, None), (4, True, 4),
                                                (4, False, None)])
def test_sigmoid_loss_matches_float64_reference(world, ring, chunk):
    ref = reference(world)
    results = [rank_fn(0, 1, ring, chunk)] if world == 1 else run_distributed(rank_fn, world, ring, chunk)
    # Mean over ranks = the batch's loss; embedding gradients are summed into each rank's rows, so the
    # rank average (what DeepSpeed does) divides by world; temperature and bias gradients are rank means.
    got = (torch.stack([r[0] for r in results]).mean(), torch.cat([r[1] for r in results]) / world,
           torch.cat([r[2] for r in results]) / world, torch.stack([r[3] for r in results]).mean(),
           torch.stack([r[4] for r in results]).mean())
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-7)
    report, sent = results[0][5], results[0][6]
    assert report["bytes_sent"] == sent == 2 * (world - 1) * B_LOCAL * DIM * 4 + 8 * (world - 1)


def test_sigmoid_needs_a_bias_and_softmax_refuses_one():
    a, b, scale = data(1)
    with pytest.raises(ValueError, match="sigmoid needs one"):
        contrastive_loss(a, b, scale, kind="sigmoid")
    with pytest.raises(ValueError, match="softmax takes no bias"):
        contrastive_loss(a, b, scale, logit_bias=torch.tensor(0.0))


def test_module_form_equals_the_function():
    from mmpt.losses import ContrastiveLoss

    a, b, scale = data(1)
    bias = torch.tensor(BIAS)
    module_loss, report = ContrastiveLoss(kind="sigmoid")(a, b, scale, bias)
    assert report["negatives_per_positive"] == B_LOCAL - 1
    torch.testing.assert_close(module_loss, contrastive_loss(a, b, scale, kind="sigmoid", logit_bias=bias)[0])
    torch.testing.assert_close(ContrastiveLoss(chunk_size=2)(a, b, scale)[0], contrastive_loss(a, b, scale)[0])
