"""The base of every error caused by bad input (data, images, checkpoints): the CLIs turn these
into one line naming the file or key and a non-zero exit, without a traceback."""


class InputError(Exception):
    """Bad input the user can fix; the message names the file (and the key or record)."""
