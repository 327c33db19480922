"""Errors that reach the user as one line: bad input exits 2, a failing environment exits 1."""


class UsageError(Exception):
    """Bad input: a flag, a file or a config value. The message names it and says what to do."""


class EnvError(Exception):
    """The environment failed (disk full, read-only folder, permission): exit status 1. The message
    says what to free or change."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving its exact position."""

    def __init__(self, signum: int, checkpoint: str):
        super().__init__(f"interrupted by signal {signum}; position saved to {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint


class Diverged(Exception):
    """Training hit a non-finite loss with --nan-policy stop: exit status 3, nothing non-finite saved."""
