"""`python -m zorba_lab`: the same as the `zorba-quickstart` command."""

from zorba_common.roles import launch

raise SystemExit(launch("zorba-quickstart"))
