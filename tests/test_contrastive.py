"""Distributed InfoNCE against a single-process float64 full-batch reference (real gloo processes)."""
import pytest
import torch
import torch.nn.functional as F

from mmpt.losses import contrastive_loss
from tests.distributed import run_distributed

B_LOCAL, DIM = 6, 16


def data(world: int):
    g = torch.Generator().manual_seed(123)
    a = F.normalize(torch.randn(world * B_LOCAL, DIM, generator=g), dim=-1)
    b = F.normalize(a + 0.5 * torch.randn(world * B_LOCAL, DIM, generator=g), dim=-1)
    return a, b, torch.tensor(7.5)


def reference(world: int):
    a, b, scale = (t.double().requires_grad_() for t in data(world))
    logits = scale * a @ b.t()
    labels = torch.arange(a.size(0))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    loss.backward()
    return loss.detach(), a.grad, b.grad, scale.grad


def rank_fn(rank: int, world: int):
    a, b, scale = data(world)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    a, b, scale = a[sl].clone().requires_grad_(), b[sl].clone().requires_grad_(), scale.clone().requires_grad_()
    loss, report = contrastive_loss(a, b, scale)
    loss.backward()
    return loss.detach(), a.grad, b.grad, scale.grad, report


@pytest.mark.parametrize("world", [1, 2, 4])
def test_distributed_infonce_matches_float64_reference(world):
    ref_loss, ref_ga, ref_gb, ref_gs = reference(world)
    if world == 1:
        results = [rank_fn(0, 1)]
    else:
        results = run_distributed(rank_fn, world)
    # Mean over ranks is the global loss; gradients are summed into each rank's slice by the gather's
    # backward, so averaging across ranks (what DeepSpeed/DDP do) means dividing by world here.
    loss = torch.stack([r[0] for r in results]).mean()
    ga = torch.cat([r[1] for r in results]) / world
    gb = torch.cat([r[2] for r in results]) / world
    gs = torch.stack([r[3] for r in results]).mean()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ga.double(), ref_ga, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gb.double(), ref_gb, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gs.double(), ref_gs, rtol=1e-5, atol=1e-7)
    assert results[0][4]["global_batch"] == world * B_LOCAL
    assert results[0][4]["negatives_per_positive"] == world * B_LOCAL - 1


def unequal_fn(rank: int, world: int):
    a = F.normalize(torch.randn(3 + rank, DIM), dim=-1)
    try:
        contrastive_loss(a, a, torch.tensor(1.0))
    except ValueError as e:
        return str(e)
    return "no error"


def test_unequal_local_batches_are_rejected_clearly():
    messages = run_distributed(unequal_fn, 2)
    assert all("local batch sizes differ across ranks [3, 4]" in m for m in messages)


def test_bf16_embeddings_give_fp32_loss():
    a, b, scale = data(1)
    loss, _ = contrastive_loss(a.bfloat16(), b.bfloat16(), scale)
    assert loss.dtype == torch.float32
    ref, _ = contrastive_loss(a, b, scale)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)
