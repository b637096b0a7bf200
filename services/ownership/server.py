"""Wiring of the ownership service into a gRPC server."""

from ds01.core.server import contract_only_spec
from ds01.v1 import ownership_pb2, ownership_pb2_grpc

SPEC = contract_only_spec("ownership", ownership_pb2, ownership_pb2_grpc, "OwnershipService")
