"""Offline sharding: raw MIMIC-CXR-JPG / CheXpert trees -> WebDataset tars (CPU only, no torch)."""
