"""`python -m zorba_sim`: the same as the `zorba-simulate` command."""

from zorba_common.roles import launch

raise SystemExit(launch("zorba-simulate"))
