"""mmpt: distributed multimodal pretraining with one shared encoder for every modality.

Importing mmpt registers the built-in modalities (mmpt.modalities) and evals (mmpt.eval), so the config schema,
the data path, the model and the CLI find them by name.

    import mmpt
    loaded = mmpt.from_pretrained("runs/demo")      # or hf-hub:ORG/NAME[@revision], local-dir:PATH
"""
__version__ = "0.1.0"

from mmpt import eval as _evals  # noqa: E402,F401,I001  (registers zeroshot, retrieval, caption)
from mmpt import modalities as _modalities  # noqa: E402,F401  (registers image, video, audio, text)
from mmpt.hub import from_pretrained  # noqa: E402

__all__ = ["from_pretrained"]
