"""One error type for bad input: its message is one line naming the file or key and the fault."""


class InputError(ValueError):
    """Bad user input (a file, a folder or a config key). `str(err)` is one readable line."""

    def __init__(self, where, fault):
        self.where = str(where)
        self.fault = fault
        super().__init__(f"{where}: {fault}")
