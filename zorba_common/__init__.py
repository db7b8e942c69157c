"""What client and server share: the seeded noise, the memory model and the wire schema."""

# The one place the release number is written: pyproject.toml reads it, `--version` prints it.
__version__ = "0.1.0"
