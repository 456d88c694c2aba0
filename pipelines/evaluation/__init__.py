"""Evaluation on Ray: retrained-subset ground truth for LDS (ARCHITECTURE §9)."""
