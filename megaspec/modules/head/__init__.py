"""Head kind: hidden states -> logits or a pooled vector."""
