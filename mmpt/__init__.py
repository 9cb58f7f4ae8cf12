"""mmpt: distributed multimodal pretraining with one shared encoder for every modality.

Importing mmpt registers the built-in modalities (mmpt.modalities) and evals (mmpt.eval), so the config schema,
the data path, the model and the CLI find them by name.
"""
__version__ = "0.1.0"

from mmpt import eval as _evals  # noqa: E402,F401,I001  (registers zeroshot, retrieval, caption)
from mmpt import modalities as _modalities  # noqa: E402,F401  (registers image, video, audio, text)


def from_pretrained(source: str, trust_plugins: bool = False):
    """Load a model: `hf-hub:ORG/NAME[@revision]`, `local-dir:PATH` or a PATH (an export or a run directory).
    Returns mmpt.hub.Pretrained(model, cfg, tokenizer, preprocess). trust_plugins=True imports the modules its
    config names in `plugins` (code chosen by the model's files)."""
    from mmpt.hub import from_pretrained as load

    return load(source, trust_plugins)
