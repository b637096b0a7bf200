"""GPU and MIG allocation kept in etcd (issue: allocator service)."""
