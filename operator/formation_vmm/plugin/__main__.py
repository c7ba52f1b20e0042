"""``python -m formation_vmm.plugin``: the kubectl plugin."""

import sys

from formation_vmm.plugin import main

sys.exit(main())
