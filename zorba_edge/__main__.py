"""`python -m zorba_edge`: the same as the `zorba-edge` command."""

from zorba_common.roles import launch

raise SystemExit(launch("zorba-edge"))
