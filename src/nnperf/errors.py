"""Errors that reach the user as one line and exit status 2."""


class UsageError(Exception):
    """Bad input: a flag, a file or a config value. The message names it and says what to do."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving its exact position."""

    def __init__(self, signum: int, checkpoint: str):
        super().__init__(f"interrupted by signal {signum}; position saved to {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint
