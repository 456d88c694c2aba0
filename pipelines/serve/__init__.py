"""The attribution query endpoint on Ray Serve (DESIGN 8): ingress, featurizer, index searchers."""
