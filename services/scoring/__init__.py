"""Scoring domain layer: distribution distances, mask statistics, segmentation metrics.

Pure numpy/scipy: no torch, no protobuf. The gRPC servicer converts requests into the
arrays these modules take and their dataclasses back into messages.

Modules:
  distances     FID (streaming feature statistics), KID, improved precision/recall,
                Inception Score, bootstrap confidence intervals.
  mask_stats    per-mask morphology features and per-feature KS / KL distribution
                comparisons (PriorPath-style real-vs-synthetic mask evaluation).
  segmentation  confusion-matrix metrics exactly as equations (1)-(5) of the
                noise-frequency pix2pixHD paper (mIoU, wIoU, wPrecision, wRecall,
                tObjective), Dice, and the PD-L1 tumour proportion score (TPS).
"""
