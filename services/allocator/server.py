"""Wiring of the allocator service into a gRPC server."""

from ds01.core.server import contract_only_spec
from ds01.v1 import allocator_pb2, allocator_pb2_grpc

SPEC = contract_only_spec("allocator", allocator_pb2, allocator_pb2_grpc, "AllocatorService")
