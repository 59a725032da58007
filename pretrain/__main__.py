import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pretrain.cli import main  # noqa: E402

sys.exit(main())
