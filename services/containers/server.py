"""Wiring of the containers service into a gRPC server."""

from ds01.core.server import contract_only_spec
from ds01.v1 import containers_pb2, containers_pb2_grpc

SPEC = contract_only_spec("containers", containers_pb2, containers_pb2_grpc, "ContainersService")
