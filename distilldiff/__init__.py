"""distilldiff: distil a frozen many-step diffusion teacher into a one- or few-step student."""

__version__ = "0.1.0"
