import sys

from gfattn_tui.app import main

sys.exit(main())
