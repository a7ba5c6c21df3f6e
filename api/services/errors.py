"""What the service layer refuses, in the domain's terms: uploads and submissions raise these, whoever calls
them (a route, the command line, a dispatcher); `api.errors` gives each kind its HTTP status, once."""

from __future__ import annotations


class ServiceError(Exception):
    """A refusal whose message says what is wrong and how to put it right."""


class InvalidFields(ServiceError):
    """Fields of the request at fault: (field, why) each, the field dotted within `within` (("spec",) for job-spec fields)."""

    def __init__(self, errors: list[tuple[str, str]], *, within: tuple[str, ...] = ()):
        super().__init__("; ".join(f"{field}: {why}" if field else why for field, why in errors))
        self.errors = errors
        self.within = within


class InvalidUpload(ServiceError):
    """The uploaded file, its name or a parameter of the upload is not one the service can take."""


class NameTaken(ServiceError):
    """The tenant already has a dataset of this name (names are references, so they are unique)."""


class IdempotencyKeyReused(ServiceError):
    """The Idempotency-Key already made a different request."""


class OverLimit(ServiceError):
    """Over the upload size limit or the tenant's storage quota."""


class UploadTimedOut(ServiceError):
    """The upload sent nothing for too long."""
