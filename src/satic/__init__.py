"""satic: semi-autoregressive image captioning (SATIC) and its autoregressive teacher."""

__version__ = "0.1.0"
