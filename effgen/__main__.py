import sys

from effgen.cli import main

sys.exit(main())
