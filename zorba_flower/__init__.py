"""zorba-edge as a Flower app: the same round engine and local trainer behind Flower's
Message API (docs/flower.md). Installed with the `flower` extra; the SDK never imports it."""
