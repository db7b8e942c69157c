"""`python -m zorba_server`: the same as the `zorba-server` command."""

from zorba_common.roles import launch

raise SystemExit(launch("zorba-server"))
