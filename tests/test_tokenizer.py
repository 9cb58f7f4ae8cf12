import json

import pytest
import torch

from mmpt.data.tokenizer import Tokenizer, decode
from mmpt.errors import ConfigError
from mmpt.model.stems import valid_mask


def test_openclip_tokenizer_offline():
    tok = Tokenizer("openclip", 8)
    ids = tok.encode("the number seven written by hand, twice as long as the context")
    assert ids.shape == (8,) and ids[0] == tok.sot_id and ids[-1] == tok.eot_id  # truncated, EOT kept
    assert decode(tok.encode("a handwritten digit").tolist(), 8) == "a handwritten digit"


def test_local_huggingface_tokenizer(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, "a": 4, "digit": 5, "seven": 6}
    raw = RawTokenizer(WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(tmp_path)
    tok = Tokenizer(str(tmp_path), 6)
    assert tok.vocab_size == 7
    ids = tok.batch(["a digit seven", "a purple digit seven again"])
    assert ids.tolist() == [[1, 4, 5, 6, 2, 0], [1, 4, 3, 5, 6, 2]]
    assert valid_mask(ids, tok.eot_id).sum(1).tolist() == [5, 6]
    from mmpt.config import load_config
    from mmpt.data.tokenizer import check_model_fits
    from mmpt.errors import ConfigError

    cfg = load_config("demo", ["model.context_length=6"]).model
    try:
        check_model_fits(str(tmp_path), cfg)
    except ConfigError as e:
        assert "model.sot_id=8512 but tokenizer has 1" in str(e) and "model.eot_id=8513" in str(e)
    else:
        raise AssertionError("expected a mismatch error")
    cfg.sot_id, cfg.eot_id = 1, 2
    check_model_fits(str(tmp_path), cfg)


def gpt2_style_tokenizer(out) -> None:
    """A byte-level BPE tokenizer as GPT-2 ships it: one <|endoftext|> token is bos, eos and unk."""
    from transformers import GPT2TokenizerFast

    out.mkdir()
    (out / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, "a": 1, "b": 2, "Ġa": 3}))
    (out / "merges.txt").write_text("#version: 0.2\n")
    GPT2TokenizerFast(vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt")).save_pretrained(out)


def test_tokenizers_that_would_empty_captions_are_refused(tmp_path):
    """GPT-2 style (one <|endoftext|> for bos and eos): the text mask would end at the begin token. Without any
    begin/end token, or without tokenizer files, there is nothing to build captions with."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    gpt2_style_tokenizer(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="begin and end tokens share id 0 \\(GPT-2 style bos == eos\\)"):
        Tokenizer(str(tmp_path / "gpt2"), 8)
    raw = RawTokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path / "plain")
    with pytest.raises(ConfigError, match="needs begin and end tokens .* it has begin=None, end=None"):
        Tokenizer(str(tmp_path / "plain"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty': not a loadable HuggingFace tokenizer directory"):
        Tokenizer(str(tmp_path / "empty"), 8)


def test_unknown_tokenizer_is_a_clear_error(tmp_path):
    try:
        Tokenizer(str(tmp_path / "nope"), 8)
    except FileNotFoundError as e:
        assert "not 'openclip', not a local tokenizer directory and not one shipped with mmpt (clip-bpe-8k" in str(e)
    else:
        raise AssertionError("expected FileNotFoundError")


def test_valid_mask_without_eot_covers_everything():
    ids = torch.tensor([[5, 6, 7]])
    assert valid_mask(ids, 99).all()


def test_packaged_clip_bpe_8k_is_open_clips_bpe_cut_to_8000_merges():
    small, full = Tokenizer("clip-bpe-8k", 16), Tokenizer("openclip", 16)
    assert (small.vocab_size, small.sot_id, small.eot_id) == (8514, 8512, 8513)
    # words within the first 8,000 merges get open_clip's own ids; only start/end move
    text = "a video of the number seven moving to the left"
    a, b = small.encode(text), full.encode(text)
    assert a[0] == 8512 and b[0] == 49406 and torch.equal(a[1:11], b[1:11]) and a[11] == 8513
    rare = small.encode("footage of a drawn eight")  # "footage" and "drawn" split into smaller pieces
    assert int((rare > 0).sum()) > int((full.encode("footage of a drawn eight") > 0).sum())
    assert small.decode(rare.tolist()) == "footage of a drawn eight"
    assert bool((small.batch(["x" * 200]) < small.vocab_size).all())


def test_packaged_tokenizer_files_match_their_build_script():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "data_pipelines/clip_bpe_tokenizer.py", "--check"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
