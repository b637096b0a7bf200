"""Wiring of the limits service into a gRPC server."""

from ds01.core.server import contract_only_spec
from ds01.v1 import limits_pb2, limits_pb2_grpc

SPEC = contract_only_spec("limits", limits_pb2, limits_pb2_grpc, "LimitsService")
