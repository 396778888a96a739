"""gantrain: GANs and VAEs trained by one phase-loop Trainer from Hydra recipes."""

__version__ = "0.1.0"
