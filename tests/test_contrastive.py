"""Distributed InfoNCE against a single-process float64 full-batch reference (real gloo processes)."""
import pytest
import torch
import torch.nn.functional as F

from mmpt.distributed import CountBytes
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


@pytest.mark.parametrize("chunk", [1, 5, 6, 7, 100])
def test_chunked_loss_and_gradients_match_float64_single_process(chunk):
    ref_loss, ref_ga, ref_gb, ref_gs = reference(2)
    a, b, scale = (t.clone().requires_grad_() for t in data(2))
    loss, report = contrastive_loss(a, b, scale, chunk_size=chunk)
    loss.backward()
    assert report["logits_bytes"] == 4 * a.size(0) * min(chunk, a.size(0))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    for got, ref in ((a.grad, ref_ga), (b.grad, ref_gb), (scale.grad, ref_gs)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)


def chunked_rank_fn(rank: int, world: int, chunk, ring: bool = False):
    a, b, scale = data(world)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    a, b, scale = a[sl].clone().requires_grad_(), b[sl].clone().requires_grad_(), scale.clone().requires_grad_()
    with CountBytes() as sent:
        loss, report = contrastive_loss(a, b, scale, chunk_size=chunk, ring=ring)
        loss.backward()
    return loss.detach(), a.grad, b.grad, scale.grad, report, sent.bytes


@pytest.mark.parametrize("world, ring, chunk", [(2, False, 5), (4, False, 5), (2, True, None), (4, True, 3)])
def test_chunked_and_ring_distributed_match_float64_reference(world, ring, chunk):
    ref_loss, ref_ga, ref_gb, ref_gs = reference(world)
    results = run_distributed(chunked_rank_fn, world, chunk, ring)
    report, sent = results[0][4], results[0][5]
    assert report["bytes_sent"] == sent and report["gathered"] == (not ring)  # the report = what was sent
    # Ring or gathered, 4 (N - 1) blocks: two passes forward and two backward, or 2 gathers + 2 reduce-scatters
    # (plus the size check, and the ring's row logsumexps).
    blocks = sent - 8 * (world - 1) - (2 * (world - 1) * 4 * B_LOCAL if ring else 0)
    assert blocks == 4 * (world - 1) * B_LOCAL * DIM * 4
    torch.testing.assert_close(torch.stack([r[0] for r in results]).mean().double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close((torch.cat([r[1] for r in results]) / world).double(), ref_ga, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close((torch.cat([r[2] for r in results]) / world).double(), ref_gb, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.stack([r[3] for r in results]).mean().double(), ref_gs, rtol=1e-5, atol=1e-7)


def grouped_rank_fn(rank: int, world: int, group_size: int, ring: bool):
    from mmpt.losses.contrastive import rank_groups

    group = rank_groups(group_size)
    a, b, scale = data(world)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    a, b, scale = a[sl].clone().requires_grad_(), b[sl].clone().requires_grad_(), scale.clone().requires_grad_()
    loss, report = contrastive_loss(a, b, scale, group=group, chunk_size=4, ring=ring)
    loss.backward()
    return loss.detach(), a.grad, b.grad, scale.grad, report


@pytest.mark.parametrize("ring", [False, True])
def test_grouped_aggregation_equals_the_per_group_reference(ring):
    world, g = 4, 2
    results = run_distributed(grouped_rank_fn, world, g, ring)
    a, b, scale = data(world)
    for first in range(0, world, g):  # ranks [first, first + g) form one group
        rows = slice(first * B_LOCAL, (first + g) * B_LOCAL)
        ga, gb = a[rows].double().requires_grad_(), b[rows].double().requires_grad_()
        gs = scale.double().requires_grad_()
        logits = gs * ga @ gb.t()
        labels = torch.arange(g * B_LOCAL)
        ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        ref.backward()
        part = results[first:first + g]
        loss = torch.stack([r[0] for r in part]).mean().double()
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close((torch.cat([r[1] for r in part]) / g).double(), ga.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close((torch.cat([r[2] for r in part]) / g).double(), gb.grad, rtol=1e-5, atol=1e-7)
        assert part[0][4]["negatives_per_positive"] == g * B_LOCAL - 1 and part[0][4]["group_size"] == g


def open_clip_rank_fn(rank: int, world: int):
    from open_clip.loss import ClipLoss

    a, b, scale = data(world)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    out = []
    for which in ("ours", "open_clip"):
        x, y, s = a[sl].clone().requires_grad_(), b[sl].clone().requires_grad_(), scale.clone().requires_grad_()
        if which == "ours":
            loss, _ = contrastive_loss(x, y, s)
        else:
            loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(x, y, s)
        loss.backward()
        out.append((loss.detach(), x.grad, y.grad, s.grad))
    return out


def test_open_clip_cliploss_agrees_with_ours_on_two_ranks():
    for ours, theirs in run_distributed(open_clip_rank_fn, 2):
        for mine, other in zip(ours, theirs, strict=True):
            torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-7)


def _encoders(seed: int = 0):
    torch.manual_seed(seed)
    enc_a = torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.Dropout(0.2))
    enc_b = torch.nn.Linear(DIM, DIM)
    return enc_a, enc_b


def _accumulated_vs_single(rank: int, world: int, group_size: int, chunk):
    from mmpt.losses.accumulate import accumulated_contrastive_backward
    from mmpt.losses.contrastive import rank_groups

    group = rank_groups(group_size) if world > 1 and group_size < world else None
    x = torch.randn(world * 12, DIM, generator=torch.Generator().manual_seed(5))[rank * 12:(rank + 1) * 12]
    grads = []
    for accumulate in (False, True):
        enc_a, enc_b = _encoders()
        scale = torch.tensor(5.0, requires_grad=True)
        norm = torch.nn.functional.normalize
        ea, eb = (lambda t: norm(enc_a(t), dim=-1)), (lambda t: norm(enc_b(t + 0.1), dim=-1))  # noqa: B023
        torch.manual_seed(100 + rank)  # same dropout masks for both paths
        if accumulate:
            loss, _ = accumulated_contrastive_backward(ea, eb, list(x.split(4)), scale, group=group, chunk_size=chunk)
        else:
            loss, _ = contrastive_loss(torch.cat([ea(m) for m in x.split(4)]), torch.cat([eb(m) for m in x.split(4)]),
                                       scale, group=group, chunk_size=chunk)
            loss.backward()
        grads.append([loss.detach(), scale.grad] + [p.grad for p in [*enc_a.parameters(), *enc_b.parameters()]])
    return grads


@pytest.mark.parametrize("world, group_size, chunk", [(1, 1, None), (1, 1, 5), (2, 2, None), (4, 2, 7)])
def test_grad_cache_accumulation_equals_one_pass_over_the_accumulated_batch(world, group_size, chunk):
    results = [_accumulated_vs_single(0, 1, 1, chunk)] if world == 1 else run_distributed(
        _accumulated_vs_single, world, group_size, chunk)
    for single, accumulated in results:
        for s, a in zip(single, accumulated, strict=True):
            torch.testing.assert_close(a, s, rtol=1e-5, atol=1e-6)
