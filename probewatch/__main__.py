import sys

from probewatch.cli import main

sys.exit(main())
