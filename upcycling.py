"""The seed's entry point: ``python upcycling.py --model_path DENSE --output_path OUT --num_experts 4``.

Same as ``moelpr upcycle``; see ``moelpr/cli/upcycle.py``.
"""

import sys

from moelpr.cli.upcycle import main

if __name__ == "__main__":
    sys.exit(main())
