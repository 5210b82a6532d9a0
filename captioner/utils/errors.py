"""The base of every error caused by bad input (data, images, checkpoints): the CLIs turn these
into one line naming the file or key and a non-zero exit, without a traceback."""

WORKER_PREFIX = "Caught "


class InputError(Exception):
    """Bad input the user can fix; the message names the file (and the key or record)."""

    def __init__(self, message: str = ""):
        # An error raised in a DataLoader worker is re-created in the main process from one
        # message holding the worker's whole traceback, whose last line is
        # "<module>.<Class>: <our message>"; keep just our message, so it stays one line.
        if (isinstance(message, str) and message.startswith(WORKER_PREFIX)
                and "\nOriginal Traceback" in message):
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)
