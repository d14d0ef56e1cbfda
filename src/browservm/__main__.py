import sys

from browservm.cli import main

sys.exit(main())
