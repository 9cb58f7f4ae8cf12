import torch

from mmpt.data.tokenizer import Tokenizer, decode
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
    from mmpt.config import ConfigError, load_config
    from mmpt.data.tokenizer import check_model_fits

    cfg = load_config("demo", ["model.context_length=6"]).model
    try:
        check_model_fits(str(tmp_path), cfg)
    except ConfigError as e:
        assert "model.sot_id=49406 but tokenizer has 1" in str(e) and "model.eot_id=49407" in str(e)
    else:
        raise AssertionError("expected a mismatch error")
    cfg.sot_id, cfg.eot_id = 1, 2
    check_model_fits(str(tmp_path), cfg)


def test_unknown_tokenizer_is_a_clear_error(tmp_path):
    try:
        Tokenizer(str(tmp_path / "nope"), 8)
    except FileNotFoundError as e:
        assert "not 'openclip' and not a local tokenizer directory" in str(e)
    else:
        raise AssertionError("expected FileNotFoundError")


def test_valid_mask_without_eot_covers_everything():
    ids = torch.tensor([[5, 6, 7]])
    assert valid_mask(ids, 99).all()
