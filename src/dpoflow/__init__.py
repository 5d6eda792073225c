"""dpoflow: reproducible DPO alignment pipeline."""
__version__ = "0.1.0"
