"""The attribution query endpoint on Ray Serve (ARCHITECTURE §8): ingress, featurizer, index searchers."""
