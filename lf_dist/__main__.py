import sys

from lf_dist.cli import main

sys.exit(main())
