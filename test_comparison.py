#!/usr/bin/env python3
"""Stage 4: evaluation under the paper's attack suite. Not implemented yet (issue 5); it prints so and exits non-zero rather than faking output."""
import sys

if __name__ == "__main__":
    print(f"{sys.argv[0]}: not implemented yet (see issue 5); stage 1 is train_standard.py", file=sys.stderr)
    sys.exit(1)
