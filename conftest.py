# Its presence puts the repository root on sys.path, so that `pytest` finds models/ and utils/.
