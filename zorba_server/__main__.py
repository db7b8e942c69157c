"""`python -m zorba_server`: the same as the `zorba-server` command."""

from zorba_server.cli import main

raise SystemExit(main())
