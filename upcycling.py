"""The seed's entry point: ``python upcycling.py --model_path DENSE --output_path OUT --num_experts 4``.

Same as ``moelpr upcycle``; see ``moelpr/upcycling/upcycle.py``.
"""

import sys

from moelpr.upcycling.upcycle import main

if __name__ == "__main__":
    sys.exit(main())
