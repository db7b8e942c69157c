import sys

from zorba_edge.demo.quickstart import main

sys.exit(main())
