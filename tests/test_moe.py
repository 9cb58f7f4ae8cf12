"""MoE routing, layers and backends; stems for every modality; named model configs."""
import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmpt import modality as registry
from mmpt.config import load_config
from mmpt.data.tokenizer import tokenize
from mmpt.losses import objective
from mmpt.model import build_model
from mmpt.model.info import model_info
from mmpt.model.moe import NativeMoE
from mmpt.model.routing import expert_choice_routing, top_k_routing
from tests.distributed import run_distributed

TOK = "clip-bpe-8k"  # the demo config's tokenizer

FOUR = ["model.modalities=[image, video, audio, text]", "model.width=32", "model.heads=2", "model.depth=2",
        "model.embed_dim=16", "model.moe.num_experts=4", "model.moe.last=1"]


def batch(size=32, frames=8, audio_frames=98, n=2):
    return {"image": torch.randn(n, 3, size, size), "video": torch.randn(n, frames, 3, size, size),
            "audio": torch.randn(n, 1, audio_frames, 128),
            "text": tokenize(["a digit", "the number seven"][:n], 16, TOK)}


@pytest.mark.parametrize("size, frames, audio_frames", [(32, 8, 98), (48, 4, 198)])
def test_every_modality_at_two_resolutions_and_durations(size, frames, audio_frames):
    cfg = load_config("demo", FOUR)
    model = build_model(cfg.model).eval()
    b = batch(size, frames, audio_frames)
    grid = (size // 8) ** 2
    expected = {"image": grid, "video": grid * frames // 2, "audio": (audio_frames // 16) * 8, "text": 16}
    for modality, n_tokens in expected.items():
        out = model.encode(modality, b[modality])
        assert out["hidden"].shape == (2, n_tokens, 32), modality
        assert out["emb"].shape == (2, 16)


def test_image_as_video_uses_the_video_stem():
    cfg = load_config("demo", FOUR + ["model.image_as_video=true"])
    model = build_model(cfg.model)
    assert "image" not in model.stems and "image" not in model.heads and "image" not in model.modality
    assert model.encode("image", torch.randn(2, 3, 32, 32))["hidden"].shape == (2, 16, 32)  # one tubelet deep
    # ... and is the video encoder: a still video is encoded as its image is
    still = torch.randn(2, 3, 32, 32)
    as_video = still.unsqueeze(1).expand(-1, cfg.model.video.tubelet, -1, -1, -1)
    torch.testing.assert_close(model.encode("image", still)["emb"], model.encode("video", as_video)["emb"])


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_conv_stem_keeps_the_token_grid(modality):
    linear, conv = (build_model(load_config("demo", FOUR + [f"model.stem={k}", "model.image_as_video=false"]).model)
                    for k in ("linear", "conv"))
    x = batch()[modality]
    assert conv.encode(modality, x)["hidden"].shape == linear.encode(modality, x)["hidden"].shape
    assert any(isinstance(m, torch.nn.GroupNorm) for m in conv.stems[modality].modules())
    # model info's stem FLOPs agree with torch's own count of the projection's convolutions
    stem_input = registry.get(modality).stem_input(x, 1)
    stem_input = stem_input[..., : stem_input.size(-2) // 16 * 16, :]  # whole audio patches
    for model in (linear, conv):
        stem = model.stems[modality]
        with FlopCounterMode(display=False) as counter:
            tokens = stem.proj(stem_input).flatten(2).size(-1)
        assert stem.flops_per_token() * tokens * x.size(0) == counter.get_total_flops()


def test_drop_token_only_in_training():
    cfg = load_config("demo", FOUR + ["model.drop_token={video: 0.5}"])
    model = build_model(cfg.model)
    video = torch.randn(2, 8, 3, 32, 32)
    assert model.encode("video", video)["hidden"].shape[1] == 32
    assert model.eval().encode("video", video)["hidden"].shape[1] == 64


def test_every_stem_and_every_used_expert_gets_a_gradient():
    cfg = load_config("demo", FOUR)
    model = build_model(cfg.model)
    b = batch()
    for pair in (("image", "text"), ("video", "text"), ("audio", "text"), ("video", "audio")):
        objective(model({m: b[m] for m in pair}), cfg.loss)["loss"].backward()
    for name, stem in model.stems.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters()), name
    moe = [m for m in model.modules() if isinstance(m, NativeMoE)]
    assert len(moe) == 1
    used = [e for e in range(4) if moe[0].w1.grad[e].abs().sum() > 0]
    assert len(used) >= 2 and moe[0].router.weight.grad.abs().sum() > 0


def test_top1_capacity_drops_are_counted_exactly():
    logits = torch.tensor([[5.0, 0.0]] * 7 + [[0.0, 5.0]] * 3)  # 7 tokens want expert 0, 3 want expert 1
    r = top_k_routing(logits, k=1, capacity_factor=1.0)  # capacity ceil(10 / 2) = 5
    assert r.capacity == 5 and int(r.dropped) == 2
    assert r.token[r.expert == 0].tolist() == [0, 1, 2, 3, 4]  # earlier tokens keep their slots
    assert top_k_routing(logits, 1, 1.0, drop_tokens=False).dropped == 0


def test_top2_first_choices_claim_slots_before_second_choices():
    logits = torch.tensor([[3.0, 2.0, -9.0]] * 4)  # all: first expert 0, second expert 1
    r = top_k_routing(logits, k=2, capacity_factor=0.75)  # capacity ceil(4 / 3 * 0.75 * 2) = 2
    assert r.capacity == 2 and int(r.dropped) == 4
    assert sorted(zip(r.token.tolist(), r.expert.tolist(), strict=True)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    gates = torch.softmax(logits[0, :2], -1)
    torch.testing.assert_close(r.gate[:2], gates[[0, 0]])


def test_expert_choice_gives_each_expert_exactly_its_capacity():
    logits = torch.randn(50, 4)
    r = expert_choice_routing(logits, capacity_factor=1.0)
    assert r.capacity == 13
    assert torch.bincount(r.expert, minlength=4).tolist() == [13] * 4
    assert int(r.dropped) == 50 - len(set(r.token.tolist()))


def _backend_rank(rank, world, k):
    import os

    import deepspeed

    from mmpt.config import MoEConfig
    from mmpt.model.moe import DeepSpeedMoE, copy_native_to_deepspeed

    os.environ["DS_ACCELERATOR"] = "cpu"
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = MoEConfig(num_experts=4, top_k=k, drop_tokens=False, ep_size=2, backend="deepspeed")
    torch.manual_seed(0)
    native = NativeMoE(cfg, 16, 32)
    ds = DeepSpeedMoE(cfg, 16, 32)
    copy_native_to_deepspeed(native, ds, expert_offset=rank * 2)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(rank + 10))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, aux_a = native(xa)
    yb, aux_b = ds(xb)
    (ya.square().sum()).backward()
    (yb.square().sum()).backward()
    local = [expert.fc1.weight.grad.t() for expert in ds.moe.deepspeed_moe.experts.deepspeed_experts]
    return (ya.detach(), yb.detach(), xa.grad, xb.grad, native.w1.grad, local,
            float(aux_a["moe_loss"]), float(aux_b["moe_loss"]))


@pytest.mark.parametrize("k", [1, 2])
def test_native_and_deepspeed_backends_agree_on_two_ranks(k):
    results = run_distributed(_backend_rank, 2, k)
    for ya, yb, ga, gb, _, _, la, lb in results:
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
        assert la == pytest.approx(lb)
    # Expert parallel: rank r owns experts 2r, 2r+1 and sees both ranks' tokens for them, so its expert gradient
    # is the sum of the native layer's gradients for that expert over the two ranks.
    native_sum = results[0][4] + results[1][4]
    for rank, result in enumerate(results):
        for i, grad in enumerate(result[5]):
            torch.testing.assert_close(grad, native_sum[rank * 2 + i], rtol=1e-4, atol=1e-6)


def test_beam_search_returns_valid_tokens_and_one_beam_is_greedy():
    cfg = load_config("demo", ["model.width=32", "model.depth=1", "model.heads=2", "model.modalities=[image, text]",
                               "data.sources=[{name: d, shards: d, modalities: [image, text]}]"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    images = torch.randn(3, 3, 32, 32)
    greedy = model.caption("image", images, max_len=6)
    assert torch.equal(model.caption("image", images, max_len=6, num_beams=1), greedy)
    beam = model.caption("image", images, max_len=6, num_beams=4)
    assert torch.equal(beam, model.caption("image", images, max_len=6, num_beams=4))  # deterministic
    for ids in (greedy, beam):
        assert (ids[:, 0] == cfg.model.sot_id).all() and ((ids >= 0) & (ids < cfg.model.vocab_size)).all()


def test_named_configs_match_documented_parameter_counts():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([\d,]+) \|", readme, flags=re.M))
    assert set(rows) >= {"demo", "imp_b16", "imp_moe_b16", "imp_moe_l16"}
    for name, documented in rows.items():
        assert model_info(load_config(name))["parameters"] == int(documented.replace(",", "")), name


@pytest.mark.parametrize("router, k", [("token_choice", 1), ("token_choice", 2), ("expert_choice", 1)])
def test_eval_routing_is_per_token_and_dropless(router, k):
    from mmpt.config import MoEConfig
    from mmpt.model.routing import eval_routing

    # Training routing at this capacity drops tokens (and expert choice ranks tokens against each other).
    cfg = MoEConfig(num_experts=4, top_k=k, router=router, capacity_factor=0.5, eval_capacity_factor=0.5)
    torch.manual_seed(0)
    layer = NativeMoE(cfg, 16, 32)
    x = torch.randn(6, 5, 16)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[1, 3:] = False  # padding, as text batches have
    with torch.no_grad():
        _, train_aux = layer(x, mask)
        assert float(train_aux["dropped_rate"]) > 0  # training behaviour unchanged
        full, aux = layer.eval()(x, mask)
        alone = [layer(x[i:i + 1, j:j + 1])[0][0, 0] for i in range(6) for j in range(5) if mask[i, j]]
    assert float(aux["dropped_rate"]) == 0
    # The same experts and gates alone as in the batch; outputs equal up to matmul rounding over other shapes.
    torch.testing.assert_close(torch.stack(alone), full[mask], rtol=1e-5, atol=1e-6)
    logits = torch.randn(7, 4)
    batch = eval_routing(logits, router, k, 0.5)
    for t in range(7):
        one = eval_routing(logits[t:t + 1], router, k, 0.5)
        assert batch.expert[batch.token == t].tolist() == one.expert.tolist()
        assert torch.equal(batch.gate[batch.token == t], one.gate)


def test_expert_choice_eval_falls_back_to_top_k_token_choice_with_router_probabilities():
    from mmpt.model.routing import eval_routing

    logits = torch.randn(9, 4)
    r = eval_routing(logits, "expert_choice", k=1, eval_capacity_factor=2.0)  # k = round(2.0) experts per token
    assert int(r.dropped) == 0 and torch.bincount(r.token, minlength=9).tolist() == [2] * 9
    top = logits.softmax(-1).topk(2, dim=-1)
    for t in range(9):
        assert sorted(r.expert[r.token == t].tolist()) == sorted(top.indices[t].tolist())
        torch.testing.assert_close(r.gate[r.token == t].sum(), top.values[t].sum())  # not renormalised
    assert torch.bincount(eval_routing(logits, "expert_choice", 1, 9.0).token).tolist() == [4] * 9  # at most E
