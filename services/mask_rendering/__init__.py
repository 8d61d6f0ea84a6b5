"""Mask rendering service: semantic class masks (+ noise label, + instance edges) -> RGB images."""
