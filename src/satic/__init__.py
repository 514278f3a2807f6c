"""satic: semi-autoregressive image captioning (SATIC) and its autoregressive teacher."""

__version__ = "0.1.0"
__all__ = ["Captioner", "__version__"]


def __getattr__(name: str):
    """`satic.Captioner` is imported on first use, so `import satic` (and the CLI's help) stays light."""
    if name == "Captioner":
        from satic.captioner import Captioner

        return Captioner
    raise AttributeError(f"module 'satic' has no attribute {name!r}")
