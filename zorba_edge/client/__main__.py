"""`python -m zorba_edge.client`: the same as the `zorba-edge` command."""

from zorba_edge.client.cli import main

raise SystemExit(main())
