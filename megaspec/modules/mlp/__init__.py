"""MLP kind: the feed-forward network and the multimodal projector."""
