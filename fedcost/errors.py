"""Every error fedcost raises on purpose.

Names end in ``Error`` (or name the event, like ``ProtocolAbort``); each message says
what is wrong and what the user can do about it. Third-party exceptions are translated
into these at the boundary where fedcost meets files, configs, messages or libraries.
"""

from __future__ import annotations

from collections.abc import Sequence


class FedcostError(Exception):
    """Base of every error fedcost raises on purpose."""


class ConfigError(FedcostError):
    """A configuration file or command-line option is invalid."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None):
        self.path = path
        self.field = field
        where = ", ".join(part for part in (path, f"field '{field}'" if field else None) if part)
        super().__init__(f"{where}: {message}" if where else message)

    @staticmethod
    def of(errors: Sequence[ConfigError]) -> ConfigError:
        """One error for every mistake found in a file: the error itself when there is one."""
        return errors[0] if len(errors) == 1 else ConfigErrors(errors)


class ConfigErrors(ConfigError):
    """Several mistakes in one file, reported together, one line each, so the user fixes
    them in one go instead of one per run."""

    def __init__(self, errors: Sequence[ConfigError]):
        self.errors = tuple(e for error in errors for e in getattr(error, "errors", (error,)))
        self.path, self.field = self.errors[0].path, self.errors[0].field
        FedcostError.__init__(self, "\n".join(map(str, self.errors)))


class DataValidationError(FedcostError):
    """A data file does not meet the schema; names the file, row and column at fault.

    ``row`` is the 1-based data row (the header is not counted), so a user can find it
    in a spreadsheet or with ``sed -n``.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str,
        row: int | None = None,
        column: str | None = None,
    ):
        self.path = path
        self.row = row
        self.column = column
        parts = [path]
        if row is not None:
            parts.append(f"row {row}")
        if column is not None:
            parts.append(f"column '{column}'")
        super().__init__(f"{', '.join(parts)}: {message}")


class MappingError(ConfigError):
    """A mapping file (source columns to schema fields) is invalid."""


class ProtocolAbort(FedcostError):
    """A protocol run (e.g. a secure-aggregation round) stopped without revealing inputs."""


class InvalidSignatureError(FedcostError):
    """A signature, MAC or ciphertext failed its check; deliberately says nothing more."""


class PrivacyBudgetExhausted(FedcostError):
    """A release would spend more privacy budget than the site's policy allows."""


class PolicyViolationError(FedcostError):
    """A job or an outgoing message breaks the site's policy."""


class DataMismatchError(PolicyViolationError):
    """A job's ``[data]`` section is not the site's data (targets, extra columns, their
    levels or order): the site refuses the job at its hello, naming the field."""


class LedgerError(FedcostError):
    """A site's release ledger is missing, cut short or edited: nothing leaves the site
    until the site restores it or resets it explicitly."""


class AuditLogTamperedError(FedcostError):
    """An audit log fails verification; names the party, the entry and what is wrong."""


class ModelFitError(FedcostError):
    """A model cannot be fitted to the data as given; says why and what to change."""


class FederationError(FedcostError):
    """A federated run failed (nodes unreachable, every reply an error, ...)."""


class RayClusterError(FedcostError):
    """The Ray cluster a simulation is pointed at does not answer, or cannot hold one site
    within the run's share of it."""


class CertificateError(FedcostError):
    """A federation certificate or revocation list fails its check against the CA."""


class KitError(ConfigError):
    """A startup kit is incomplete, expired or revoked; says what the site must ask for."""


class CoordinatorUnreachableError(FederationError):
    """The coordinator's address does not answer, or not with the federation's certificate."""
