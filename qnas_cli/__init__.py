"""qnas: quantization-aware NAS that ships fully int8 TFLite models."""
__version__ = "0.1.0"
