"""mmpt: distributed multimodal pretraining with one shared encoder for every modality."""
__version__ = "0.1.0"


def from_pretrained(spec: str, trust_plugins: bool = False):
    """Load a model: `hf-hub:ORG/NAME[@revision]`, `local-dir:PATH` or a PATH (an export or a run directory).
    Returns mmpt.hub.Pretrained(model, cfg, tokenizer, preprocess). Imported lazily: `import mmpt` stays light.
    trust_plugins=True imports the modules its config names in `plugins` (code chosen by the model's files)."""
    from mmpt.hub import from_pretrained as load

    return load(spec, trust_plugins)
