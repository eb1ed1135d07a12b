import sys

from sidcore.cli import main

sys.exit(main())
