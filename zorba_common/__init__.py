"""What client and server share: the seeded noise, the memory model and the wire schema."""
