"""Evaluation on Ray: retrained-subset ground truth for LDS (DESIGN 9)."""
