import pytest
import torch

from mmpt.config import load_config
from mmpt.data.tokenizer import tokenize
from mmpt.losses import objective
from mmpt.model import build_model

TOK = "clip-bpe-8k"  # the demo config's tokenizer

IMAGE_TEXT = "data.sources=[{name: d, shards: d, modalities: [image, text]}]"


@pytest.fixture(scope="module")
def cfg():
    return load_config("demo", ["model.width=32", "model.depth=2", "model.heads=2", "model.embed_dim=16",
                                "model.modalities=[image, text]", IMAGE_TEXT])


def batch(size: int = 32, n: int = 4):
    captions = ["a handwritten digit seven", "the number 3 written by hand", "four", "a photo of the digit one"]
    return {"image": torch.randn(n, 3, size, size), "text": tokenize(captions[:n], 16, TOK)}


def test_forward_shapes_and_unit_embeddings(cfg):
    model = build_model(cfg.model)
    out = model(batch())
    assert set(out["emb"]) == {"image", "text"}
    for emb in out["emb"].values():
        assert emb.shape == (4, 16)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    assert out["logit_scale"]["image-text"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    # Caption targets only for real target positions: every token after SOT up to and including EOT.
    text = batch()["text"]
    n_targets = int(((text == cfg.model.eot_id).int().argmax(dim=1)).sum())
    assert out["caption_hidden"].shape == (n_targets, cfg.model.width)
    assert model.decoder.logits(out["caption_hidden"]).shape == (n_targets, cfg.model.vocab_size)
    assert out["caption_targets"].shape == (n_targets,)


@pytest.mark.parametrize("size", [32, 48])
def test_image_stem_serves_two_resolutions(cfg, size):
    model = build_model(cfg.model)
    out = model.encode("image", torch.randn(2, 3, size, size))
    assert out["hidden"].shape == (2, (size // cfg.model.patch_size) ** 2, cfg.model.width)


def test_padding_does_not_change_text_embedding(cfg):
    model = build_model(cfg.model).eval()
    short = tokenize(["a digit"], 16, TOK)
    emb_a = model.encode("text", short)["emb"]
    noisy = short.clone()
    noisy[0, 5:] = 1234  # garbage after EOT must be masked out
    emb_b = model.encode("text", noisy)["emb"]
    torch.testing.assert_close(emb_a, emb_b)


def test_backward_reaches_every_stem_trunk_head_and_decoder(cfg):
    model = build_model(cfg.model)
    losses = objective(model(batch()), cfg.loss)
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert set(losses) >= {"loss", "contrastive_loss/image-text", "caption_loss"}


def test_generate_returns_valid_tokens(cfg):
    model = build_model(cfg.model).eval()
    ids = model.caption("image", torch.randn(3, 3, 32, 32), max_len=8)
    assert ids.shape[0] == 3 and ids.shape[1] <= 8
    assert (ids[:, 0] == cfg.model.sot_id).all()
    assert ((ids >= 0) & (ids < cfg.model.vocab_size)).all()


def test_grad_checkpointing_gives_same_gradients(cfg):
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    ckpt_cfg = load_config("demo", ["model.width=32", "model.depth=2", "model.heads=2", "model.embed_dim=16",
                                    "model.modalities=[image, text]", IMAGE_TEXT, "model.grad_checkpointing=true"])
    ckpt = build_model(ckpt_cfg.model)
    ckpt.load_state_dict(plain.state_dict())
    b = batch()
    for m in (plain, ckpt):
        objective(m(b), cfg.loss)["loss"].backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name, rtol=1e-4, atol=1e-6)


def test_own_trunk_gives_text_a_tower_of_its_own(cfg):
    """model.own_trunk=[text]: open_clip's two towers. Text's gradient reaches only its own trunk, the image's
    only the shared one; with the same weights in both trunks the embeddings equal the shared model's."""
    from dataclasses import replace

    torch.manual_seed(0)
    shared = build_model(cfg.model)
    towers = build_model(replace(cfg.model, own_trunk=["text"]))
    towers.load_state_dict({**shared.state_dict(), **{f"own_trunks.text.{k}": v
                                                       for k, v in shared.trunk.state_dict().items()}})
    x = batch()
    for m in ("image", "text"):
        torch.testing.assert_close(towers.encode(m, x[m])["emb"], shared.encode(m, x[m])["emb"])
    towers.encode("text", x["text"])["emb"].sum().backward()
    assert all(p.grad is None for p in towers.trunk.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in towers.own_trunks["text"].parameters())
