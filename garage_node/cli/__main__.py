import sys

from garage_node.cli import main

sys.exit(main())
