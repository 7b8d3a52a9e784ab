"""distgrow: don't decay the learning rate, increase the batch size."""

__version__ = "0.1.0"
