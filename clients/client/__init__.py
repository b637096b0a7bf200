"""The Python client library for ds01: typed calls, deadlines, retries, readable errors."""

from ds01.client.client import Ds01Client, Ds01Error
from ds01.client.credentials import ClientIdentity, EnrollmentError, enroll, find_identity

__all__ = [
    "ClientIdentity",
    "Ds01Client",
    "Ds01Error",
    "EnrollmentError",
    "enroll",
    "find_identity",
]
