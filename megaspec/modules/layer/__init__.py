"""Layer and block kinds: the transformer layer and the stack of them."""
