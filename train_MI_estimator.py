#!/usr/bin/env python3
"""Stage 2a: MI estimators trained with the paper's Eq. 5. Not implemented yet (issue 3); it prints so and exits non-zero rather than faking output."""
import sys

if __name__ == "__main__":
    print(f"{sys.argv[0]}: not implemented yet (see issue 3); stage 1 is train_standard.py", file=sys.stderr)
    sys.exit(1)
