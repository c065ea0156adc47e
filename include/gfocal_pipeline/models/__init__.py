"""Detector models beyond GFocalV2, each a self-contained plain-PyTorch package."""
