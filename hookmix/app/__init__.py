"""The ``hookmix`` command line and its jobs: head-only fine-tuning of torchvision / timm models on image
folders, the digits-transfer demo, and the model and data loading they need.

The library (``hookmix``) never imports this package; the application builds on the library's public API.
"""

__all__ = []
