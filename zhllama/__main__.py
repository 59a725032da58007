import sys

from zhllama.cli_main import main

sys.exit(main())
