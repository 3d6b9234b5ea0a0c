import sys

from covshift.cli import main

sys.exit(main())
