"""Centred embeddings (loss.centre_embeddings): the distributed loss against a single-process float64 reference,
GBA groups, the running centres every rank keeps, and evaluation subtracting them."""
import pytest
import torch
import torch.nn.functional as F

from mmpt.config import load_config
from mmpt.config.schema import LossConfig
from mmpt.losses import contrastive_terms
from tests.distributed import run_distributed

B_LOCAL, DIM, SCALE = 6, 16, 7.5
PAIR = "image-text"
TINY = ["model.width=32", "model.depth=2", "model.heads=2", "model.embed_dim=16", "model.moe.num_experts=0",
        "model.modalities=[image, text]", "model.image_size=16", "loss.centre_embeddings=true",
        "data.sources=[{name: d, shards: d, modalities: [image, text]}]"]


def data(world: int):
    """Embeddings sharing one direction, as a model's are at initialisation (mean cosine about 0.9)."""
    g = torch.Generator().manual_seed(5)
    shared = torch.randn(DIM, generator=g)
    a = F.normalize(3 * shared + torch.randn(world * B_LOCAL, DIM, generator=g), dim=-1)
    b = F.normalize(-3 * shared + a + 0.5 * torch.randn(world * B_LOCAL, DIM, generator=g), dim=-1)
    return a, b


def reference(a: torch.Tensor, b: torch.Tensor):
    a, b = a.double().requires_grad_(), b.double().requires_grad_()
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    ac, bc = F.normalize(a - a.mean(0), dim=-1), F.normalize(b - b.mean(0), dim=-1)
    logits, labels = scale * ac @ bc.t(), torch.arange(a.size(0))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    loss.backward()
    return loss.detach(), a.grad, b.grad, scale.grad


def rank_fn(rank: int, world: int, group_size: int, ring: bool, chunk):
    from mmpt.losses.contrastive import rank_groups

    group = rank_groups(group_size) if group_size < world else None
    a, b = data(world)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    a, b = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
    scale = torch.tensor(SCALE, requires_grad=True)
    cfg = LossConfig(centre_embeddings=True, contrastive_ring=ring, contrastive_chunk=chunk)
    total, report = contrastive_terms({"image": a, "text": b}, {PAIR: scale}, cfg, group)
    total.backward()
    return report[f"contrastive_loss/{PAIR}"].detach(), a.grad, b.grad, scale.grad


def _check_group(results: list, first: int, size: int) -> None:
    """The mean over the group's ranks of their losses and gradients against the group batch's reference."""
    a, b = data(len(results))
    rows = slice(first * B_LOCAL, (first + size) * B_LOCAL)
    ref = reference(a[rows], b[rows])
    mine = results[first:first + size]
    # Each rank holds its rows' gradient summed over every rank's loss; DeepSpeed averages over ranks.
    got = (torch.stack([r[0] for r in mine]).mean(), torch.cat([r[1] for r in mine]) / size,
           torch.cat([r[2] for r in mine]) / size, torch.stack([r[3] for r in mine]).mean())
    # 1e-4, not test_contrastive's 1e-5: subtracting the shared direction leaves rows about a third as long,
    # so float32 rounding is amplified by cancellation (measured up to 2.4e-5 in one process). A wrong mean or
    # a missing gradient path is off by O(1).
    for value, expected in zip(got, ref, strict=True):
        torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-6)


def test_centring_one_process_matches_float64_reference():
    _check_group([rank_fn(0, 1, 1, False, None)], 0, 1)


@pytest.mark.parametrize("ring, chunk", [(False, None), (False, 5), (True, None)])
def test_centred_distributed_loss_and_gradients_match_float64_reference(ring, chunk):
    _check_group(run_distributed(rank_fn, 2, 2, ring, chunk), 0, 2)


def test_grouped_aggregation_centres_each_group_on_its_own_batch():
    results = run_distributed(rank_fn, 4, 2, False, None)
    for first in (0, 2):
        _check_group(results, first, 2)


def track_fn(rank: int, world: int):
    from mmpt.data.tokenizer import tokenize
    from mmpt.model import build_for_run
    from mmpt.train.engine import TrainModule

    cfg = load_config("demo", TINY)
    torch.manual_seed(0)
    module = TrainModule(build_for_run(cfg), cfg.loss).train()
    gen = torch.Generator().manual_seed(rank)
    batch = {"image": torch.randn(4, 3, 16, 16, generator=gen),
             "text": tokenize(["one", "two", "three", "four"][rank:] + ["one", "two", "three", "four"][:rank], 16,
                              "clip-bpe-8k")}
    module(batch)["loss"].backward()
    with torch.no_grad():
        raw = module.model(batch, caption=False)["emb"]  # train mode: uncentred
    return {m: module.model.centres.get_buffer(m).clone() for m in ("image", "text")}, raw


def test_every_rank_keeps_the_same_running_centres_the_global_batch_mean():
    results = run_distributed(track_fn, 2)
    for m in ("image", "text"):
        expected = torch.cat([raw[m] for _, raw in results]).mean(0)  # the first batch sets the centre
        for centres, _ in results:
            torch.testing.assert_close(centres[m], expected, rtol=1e-5, atol=1e-6)


def test_evaluation_subtracts_the_running_centre_and_zeros_change_nothing():
    from mmpt.model import build_for_run

    cfg = load_config("demo", TINY)
    torch.manual_seed(0)
    model = build_for_run(cfg)
    images = torch.randn(5, 3, 16, 16)
    raw = model.train().encode("image", images)["emb"]
    assert torch.equal(model.eval().encode("image", images)["emb"], raw)  # never trained centred: as before
    model.centres.update("image", raw.mean(0))
    model.centres.update("image", raw[0])  # then a running mean: 0.9 of the old, 0.1 of the new
    centre = 0.9 * raw.mean(0) + 0.1 * raw[0]
    torch.testing.assert_close(model.centres.get_buffer("image"), centre)
    torch.testing.assert_close(model.encode("image", images)["emb"], F.normalize(raw - centre, dim=-1))
    assert torch.equal(model.train().encode("image", images)["emb"], raw)  # training centres in the loss


def test_a_checkpoint_from_before_centring_loads_with_zero_centres():
    from mmpt.model import build_for_run

    cfg = load_config("demo", TINY)
    model = build_for_run(cfg)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("centres.")}
    model.centres.update("text", torch.ones(16))
    model.load_state_dict(old)  # strict
    assert not model.centres.get_buffer("text").any()
