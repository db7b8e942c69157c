"""zorba-sim: many heterogeneous virtual devices in one process, on the real round engine and
trainer, with virtual time (see docs/simulator.md). Research tooling: it imports both the SDK
(`zorba_edge`) and the server (`zorba_server`), which never import each other's internals."""
