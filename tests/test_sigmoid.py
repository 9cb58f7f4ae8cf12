"""Sigmoid (SigLIP) contrastive loss, gathered and ring, against a single-process float64 full batch."""
import pytest
import torch
import torch.nn.functional as F

from mmpt.distributed import CountBytes
from mmpt.losses import contrastive_loss
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
    for g, r in zip(got, ref, strict=True):
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


def bf16_rank_fn(rank: int, world: int, kind: str, ring: bool):
    a, b, scale = data(world)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    a, b = a[sl].bfloat16().requires_grad_(), b[sl].bfloat16().requires_grad_()
    bias = torch.tensor(BIAS) if kind == "sigmoid" else None
    with CountBytes() as sent:
        loss, report = contrastive_loss(a, b, scale, kind=kind, logit_bias=bias, ring=ring, chunk_size=4)
        loss.backward()
    return loss.detach(), a.grad, b.grad, report["bytes_sent"], sent.bytes


@pytest.mark.parametrize("kind, ring", [("softmax", False), ("softmax", True), ("sigmoid", True)])
def test_bf16_embeddings_travel_as_bf16_and_are_scored_in_fp32(kind, ring):
    """Same inputs rounded to bf16: the fp32 loss equals the float64 reference of the rounded inputs (to fp32
    accuracy); gradients come back bf16; half the fp32 bytes are sent."""
    world = 2
    results = run_distributed(bf16_rank_fn, world, kind, ring)
    a, b, scale = (t.bfloat16().double().requires_grad_() for t in data(world))
    logits = scale * a @ b.t()
    if kind == "sigmoid":
        logits = logits + BIAS
        ref = -F.logsigmoid((2 * torch.eye(a.size(0), dtype=torch.float64) - 1) * logits).sum() / a.size(0)
    else:
        labels = torch.arange(a.size(0))
        ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    ref.backward()
    torch.testing.assert_close(torch.stack([r[0] for r in results]).mean().double(), ref.detach(), rtol=1e-5, atol=1e-6)
    grad_a = torch.cat([r[1] for r in results])
    assert grad_a.dtype == torch.bfloat16
    torch.testing.assert_close(grad_a.double() / world, a.grad, rtol=2e-2, atol=2e-3)
    blocks = {"softmax": 4, "sigmoid": 2}[kind] * (world - 1) * B_LOCAL * DIM * 2  # bf16 rows
    lse = 2 * (world - 1) * 4 * B_LOCAL if ring and kind == "softmax" else 0
    assert results[0][3] == results[0][4] == blocks + lse + 8 * (world - 1)
