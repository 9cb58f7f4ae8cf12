"""mmpt: distributed multimodal pretraining with one shared encoder for every modality."""
__version__ = "0.1.0"
