"""The user's mistakes, as exceptions: each message names the file, key or field at fault, so the CLI prints
one line and exits 2 (`mmpt.cli`). Library code raises these for anything a user can fix; anything else is a bug.
"""


class UserError(ValueError):
    """A mistake the user can fix; the message names the file, key or field."""


class ConfigError(UserError):
    """A user mistake in a config file or override; the message names the key or file."""


class UntrustedPluginError(ConfigError):
    """A loaded run's, export's or hub repo's config names a plugin module that is not imported yet: importing it
    would run code the file chose. The message names the module and the opt-in."""


class DataError(UserError):
    """A data problem (missing shards, bad manifest, unreadable run files); the message names the file."""


class LaunchError(UserError):
    """A launcher environment (SLURM, MPI, torchrun) that mmpt cannot adopt; the message names the variable."""
