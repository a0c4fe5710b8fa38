"""cxrfast: fast self-supervised pre-training on chest X-rays."""

__version__ = "0.1.0"
