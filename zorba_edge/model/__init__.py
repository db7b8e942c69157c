"""Loading causal LMs block by block, with assigned blocks trainable and the rest frozen."""
