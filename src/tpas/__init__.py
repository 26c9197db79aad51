"""tpas: Text-based Person Anomaly Search toolkit."""

__version__ = "0.1.0"
