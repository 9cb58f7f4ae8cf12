"""The caption decoder learns to condition on its context within a demo-sized budget, and checkpoints from before
its token table's scale load unchanged."""
import re

import torch
import torch.nn.functional as F

from mmpt.config import load_config
from mmpt.data.tokenizer import decode, tokenize
from mmpt.model.heads import CaptionDecoder
from mmpt.train.engine import adamw, lr_lambda, param_groups

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# The demo's digit captions (data_pipelines/demo_digits.py): {0} the word, {1} the numeral.
TEMPLATES = ["a handwritten digit {0}", "the number {1} written by hand", "a photo of the digit {0}",
             "a scanned handwritten {1}", "the digit {0}, handwritten", "a small hand drawn {0}",
             "a blurry picture of the number {0}", "handwriting: {1}"]


def contexts(classes: torch.Tensor, prototypes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Encoder tokens (B, N, D) of each sample's class, plus noise: a trivially separable 'image'."""
    noise = torch.randn(len(classes), *prototypes.shape[1:], generator=gen)
    return F.layer_norm(prototypes[classes] + 0.3 * noise, prototypes.shape[-1:])


def test_decoder_names_the_class_of_its_context_within_the_demo_budget():
    """The demo's decoder (8.5k-token tied table, width 128, 1 + 1 layers) and optimizer (AdamW lr 3e-4,
    betas 0.9/0.98, eps 1e-6, 50 warmup steps then cosine), 150 steps of 32: before the table's scale it was
    still learning the templates (loss 3.1, every caption "a handwritten digit"; after: 0.29, 100/100 named)."""
    cfg = load_config("demo")
    m, o, steps = cfg.model, cfg.optim, 150
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    decoder = CaptionDecoder(m)
    optimizer = adamw(param_groups(decoder, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, steps))
    prototypes = torch.randn(10, 16, m.width, generator=gen)
    for _ in range(steps):
        classes = torch.randint(0, 10, (32,), generator=gen)
        texts = [TEMPLATES[int(t)].format(WORDS[c], c) for c, t in
                 zip(classes.tolist(), torch.randint(0, len(TEMPLATES), (32,), generator=gen), strict=True)]
        out = decoder(tokenize(texts, m.context_length, cfg.data.tokenizer),
                      contexts(classes, prototypes, gen), torch.ones(32, 16, dtype=torch.bool))
        loss = F.cross_entropy(decoder.logits(out["caption_hidden"]), out["caption_targets"])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), o.grad_clip)
        optimizer.step()
        schedule.step()
    classes = torch.arange(100) % 10
    decoder.eval()
    with torch.no_grad():
        ids = decoder.generate(contexts(classes, prototypes, gen), torch.ones(100, 16, dtype=torch.bool))
    captions = [decode(row.tolist(), m.context_length, cfg.data.tokenizer) for row in ids]
    named = [bool(re.search(rf"\b({WORDS[c]}|{c})\b", text))
             for c, text in zip(classes.tolist(), captions, strict=True)]
    assert sum(named) >= 80, (loss.item(), captions[:10])


def test_checkpoint_from_before_the_token_scale_loads_the_same_decoder():
    """An old checkpoint has no `token_scale` and holds the table as used: loaded, it computes what it did."""
    from mmpt.model.heads import TOKEN_SCALE
    cfg = load_config("demo", ["model.width=32", "model.heads=2"])
    torch.manual_seed(0)
    new = CaptionDecoder(cfg.model).eval()
    old_state = {k: v for k, v in new.state_dict().items() if k != "token_scale"}
    old_state["token.weight"] = new.token.weight.detach() * TOKEN_SCALE  # the table as the old code stored it
    loaded = CaptionDecoder(cfg.model).eval()
    loaded.load_state_dict(old_state, strict=True)
    tokens = tokenize(["a handwritten digit two"], cfg.model.context_length, cfg.data.tokenizer)
    context = torch.randn(1, 4, 32)
    mask = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        a, b = new(tokens, context, mask), loaded(tokens, context, mask)
    assert loaded.token_scale.item() == 1.0
    torch.testing.assert_close(new.logits(a["caption_hidden"]), loaded.logits(b["caption_hidden"]))
    assert torch.equal(new.generate(context, mask), loaded.generate(context, mask))
