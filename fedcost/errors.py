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
        self.errors: tuple[ConfigError, ...] = (self,)
        where = ", ".join(part for part in (path, f"field '{field}'" if field else None) if part)
        super().__init__(f"{where}: {message}" if where else message)

    @classmethod
    def of(cls, errors: Sequence[ConfigError]) -> ConfigError:
        """One error for every mistake found in a file, one line each, so the user fixes them
        in one go: the error itself when there is one, else one of this class (a
        ``MappingError`` stays one) holding them all in ``errors``, its ``path`` and
        ``field`` the first one's."""
        every = tuple(e for error in errors for e in error.errors)
        if len(every) == 1:
            return every[0]
        together = cls.__new__(cls)
        FedcostError.__init__(together, "\n".join(map(str, every)))
        together.path, together.field, together.errors = every[0].path, every[0].field, every
        return together


class FieldError(ValueError):
    """A field of a file being read is missing or wrong: raised inside a ``from_dict`` or a
    dataclass's checks, turned once at the file's boundary into the ``ConfigError`` that
    names the file and the dotted field (``fedcost.tomlfile``)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field '{field}': {reason}")
        self.field = field
        self.reason = reason


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
        self.message = message
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

    @classmethod
    def job_refused(cls, reason: str) -> PolicyViolationError:
        """The site turns a job down (at its hello or later): ``reason`` names what it asked for."""
        return cls(f"the site policy refuses this job: {reason}")

    @classmethod
    def request_refused(cls, reason: str) -> PolicyViolationError:
        """The site turns one request down: malformed, out of turn or outside the accepted job."""
        return cls(f"the site refuses this request: {reason}")


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


class SumNotRecoveredError(FederationError):
    """A shared sum could not be completed; ``dropouts``: each site left out, with its reason."""

    def __init__(self, message: str, dropouts: dict[str, str]):
        super().__init__(message)
        self.dropouts = dropouts


class RayClusterError(FedcostError):
    """The Ray cluster a simulation is pointed at does not answer, or cannot hold one site
    within the run's share of it."""


class CertificateError(FedcostError):
    """A federation certificate or revocation list fails its check against the CA."""


class KitError(ConfigError):
    """A startup kit is incomplete, expired or revoked; says what the site must ask for."""


class CoordinatorUnreachableError(FederationError):
    """The coordinator's address does not answer, or not with the federation's certificate."""
