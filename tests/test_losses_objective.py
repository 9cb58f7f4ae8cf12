"""The objective's one definition (mmpt.losses.objective), taken whole (`objective`) and taken apart the way an
accumulated GradCache step takes it (mmpt.losses.accumulate): the same loss, report and gradients, on one
process (the losses compute in fp32, so fp32 tolerances). tests/test_accumulate.py checks the same through
real DeepSpeed engines on two ranks."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmpt.losses.accumulate import cached_gradients, micro_batch_shares, surrogate
from mmpt.losses.objective import accumulated_report, objective
from mmpt.modality import pair_name

PAIR = pair_name("image", "text")
ROWS, TOKENS, VOCAB = (3, 5), (4, 7), 11  # two micro-batches: their rows and their caption tokens


def _loss_cfg(kind: str, centre: bool = False) -> SimpleNamespace:
    return SimpleNamespace(contrastive_kind=kind, contrastive_chunk=None, contrastive_ring=False, max_logit_scale=100.0,
                           contrastive_weight=0.7, caption_weight=0.3, centre_embeddings=centre)


def _leaves(kind: str) -> dict:
    """The whole batch's model outputs as leaves: embeddings, temperature (and bias), the caption targets' hidden
    states and the token table every micro-batch shares, and an MoE aux loss per micro-batch."""
    gen = torch.Generator().manual_seed(0)
    n = sum(ROWS)
    leaves = {"image": F.normalize(torch.randn(n, 6, generator=gen, dtype=torch.float32), dim=1),
              "text": F.normalize(torch.randn(n, 6, generator=gen, dtype=torch.float32), dim=1),
              "logit_scale": torch.tensor(4.0, dtype=torch.float32),
              "caption_hidden": torch.randn(sum(TOKENS), 6, generator=gen, dtype=torch.float32),
              "caption_table": torch.randn(VOCAB, 6, generator=gen, dtype=torch.float32),
              "moe_loss": torch.rand(len(ROWS), generator=gen, dtype=torch.float32)}
    if kind == "sigmoid":
        leaves["logit_bias"] = torch.tensor(-2.0, dtype=torch.float32)
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    leaves["caption_targets"] = torch.randint(0, VOCAB, (sum(TOKENS),), generator=gen)
    return leaves


def _out(leaves: dict, rows: slice, tokens: slice, micro: int | None) -> dict:
    """A model output over `rows` (and `tokens`), as MultimodalModel.forward spells it. The MoE aux loss of the
    whole batch is the micro-batches' mean (per micro-batch losses, as in any gradient accumulation)."""
    moe = leaves["moe_loss"].mean() if micro is None else leaves["moe_loss"][micro]
    out = {"emb": {m: leaves[m][rows] for m in ("image", "text")}, "logit_scale": {PAIR: leaves["logit_scale"]},
           "caption_hidden": leaves["caption_hidden"][tokens], "caption_targets": leaves["caption_targets"][tokens],
           "caption_table": leaves["caption_table"], "caption_scale": torch.tensor([1.5]),
           "aux": {"image.layer1.moe_loss": moe}}
    if "logit_bias" in leaves:
        out["logit_bias"] = {PAIR: leaves["logit_bias"]}
    return out


def _grads(leaves: dict) -> dict:
    return {k: v.grad.clone() for k, v in leaves.items() if v.grad is not None}


@pytest.mark.parametrize("centre", [False, True])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_accumulated_terms_give_the_whole_batch_objective_and_gradients(kind, centre):
    cfg = _loss_cfg(kind, centre)
    leaves = _leaves(kind)
    whole = objective(_out(leaves, slice(None), slice(None), None), cfg)
    whole["loss"].backward()
    expected = _grads(leaves)

    leaves = _leaves(kind)
    embs = {m: leaves[m].detach() for m in ("image", "text")}
    pair_values = {k: {PAIR: leaves[k].detach()} for k in ("logit_scale", "logit_bias") if k in leaves}
    emb_grad, pair_grad, contrastive = cached_gradients(embs, pair_values, cfg)
    shares = micro_batch_shares(emb_grad, pair_grad, list(ROWS), list(TOKENS))
    parts, row, token = [], 0, 0
    for i, cached in enumerate(shares):
        out = _out(leaves, slice(row, row + ROWS[i]), slice(token, token + TOKENS[i]), i)
        losses = surrogate(out, cached, cfg)
        losses.pop("loss").backward()
        parts.append({k: v.detach() for k, v in losses.items()})
        row, token = row + ROWS[i], token + TOKENS[i]
    report = accumulated_report(contrastive, parts, [s["caption_share"] for s in shares])

    assert set(report) == set(whole)
    for key, value in whole.items():
        torch.testing.assert_close(report[key], value.detach(), rtol=1e-5, atol=1e-7, msg=key)
    got = _grads(leaves)
    assert set(got) == set(expected)
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, rtol=1e-5, atol=1e-7, msg=key)
