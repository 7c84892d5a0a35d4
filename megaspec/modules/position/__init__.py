"""Position kinds: learned and rotary position embeddings, and T5's relative attention bias."""
