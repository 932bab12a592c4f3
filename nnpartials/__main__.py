import sys

from nnpartials.cli import main

sys.exit(main())
