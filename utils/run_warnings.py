"""Warnings a stage raises: one line on stderr when it happens, and kept in the run folder's
warnings.json, from which reproduce.py lists every stage's warnings in the study's results.md and in
its closing summary (a warning that only scrolled past in a log was, in effect, hidden)."""
import json
import sys
from pathlib import Path

from tqdm import tqdm

from utils.checkpoint import atomic_write_json

WARNINGS_FILE = "warnings.json"


class RunWarnings:
    """The warnings of one run, in the order raised, each once."""

    def __init__(self):
        self.messages, self.path = [], None

    def warn(self, message: str):
        tqdm.write(f"warning: {message}", file=sys.stderr)
        if message not in self.messages:
            self.messages.append(message)
            self._save()

    def keep_in(self, folder, fresh: bool = False):
        """Keep the warnings (those raised so far included) in folder/warnings.json. A resumed run adds to
        the ones its folder already holds; fresh=True (an evaluation written anew) replaces them."""
        self.path = Path(folder) / WARNINGS_FILE
        if not fresh:
            earlier = read_warnings(folder)
            self.messages = earlier + [m for m in self.messages if m not in earlier]
        self._save(always=fresh)

    def _save(self, always: bool = False):
        if self.path is not None and (self.messages or always or self.path.is_file()):
            atomic_write_json(self.path, {"warnings": self.messages})


def read_warnings(folder) -> list:
    """The warnings kept in folder/warnings.json (none when there is no such file)."""
    path = Path(folder) / WARNINGS_FILE
    if not path.is_file():
        return []
    try:
        return [str(message) for message in json.loads(path.read_text())["warnings"]]
    except (ValueError, KeyError, TypeError):
        return [f"{path} is unreadable: its warnings are lost"]
