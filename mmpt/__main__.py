import sys

from mmpt.cli import main

sys.exit(main())
