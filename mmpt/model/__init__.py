"""The multimodal model: stems (per modality) -> one shared trunk -> heads (per modality) + caption decoder.

    from mmpt.config import load_config
    from mmpt.model import build_model
    model = build_model(load_config("demo").model)
    out = model({"image": images, "text": tokens})   # out["emb"]["image"], out["logit_scale"]["image-text"]
"""
from mmpt.model.model import MultimodalModel, build_for_run, build_model

__all__ = ["MultimodalModel", "build_for_run", "build_model"]
