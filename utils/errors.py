"""One way to report bad input: raise UserError, and the script's entry point prints one line and exits."""
import sys


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line on stderr (no traceback)."""


def run_main(main, argv=None):
    """Run a script's main(argv); turn UserError and Ctrl-C into one stderr line and a non-zero exit."""
    prog = sys.argv[0].rsplit("/", 1)[-1]
    try:
        return main(argv)
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the last checkpoint written is intact (use --resume)", file=sys.stderr)
        sys.exit(130)
