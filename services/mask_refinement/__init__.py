"""Mask refinement service: coarse tissue masks -> fine tissue masks (PriorPath U-Net)."""
