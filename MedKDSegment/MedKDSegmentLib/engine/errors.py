"""User-facing errors: each names the problem and what to do about it."""


class MedKDError(Exception):
    """An error caused by the user's input or environment, with a suggested fix.

    The CLI prints it without a traceback and exits non-zero; the Slicer module
    shows it in a message box.
    """

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} {fix}".strip())


class InvalidInputError(MedKDError):
    """An image or label volume that cannot be used as given."""


class BundleError(MedKDError):
    """A model bundle that is missing, corrupt, tampered with or incompatible."""


class CancelledError(MedKDError):
    """The user cancelled a running job."""

    def __init__(self) -> None:
        super().__init__("The job was cancelled.", "Nothing was written.")
