#!/usr/bin/env python3
"""Stage 3: NAMID training (Eq. 9). Not implemented yet (issue 4); it prints so and exits non-zero rather than faking output."""
import sys

if __name__ == "__main__":
    print(f"{sys.argv[0]}: not implemented yet (see issue 4); stage 1 is train_standard.py", file=sys.stderr)
    sys.exit(1)
