import sys

from zorba_lab.quickstart import main

sys.exit(main())
