import sys

from vocab.cli import main

sys.exit(main())
