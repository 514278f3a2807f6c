import sys

from satic.cli import main

sys.exit(main())
