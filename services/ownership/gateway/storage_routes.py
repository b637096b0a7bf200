"""Admission of volume and network requests: each is its creator's, labelled by the
gateway and never by the caller."""

from __future__ import annotations

import json
from urllib.parse import quote

from ds01.ownership.gateway import filters, policy, verify
from ds01.ownership.gateway.decisions import Decision, NotFound, message
from ds01.ownership.gateway.policy import Refused, denial
from ds01.ownership.gateway.request import Request


class StorageRoutes(Request):
    # --- volumes and networks --------------------------------------------------------

    async def _volume_list(self, body: bytes) -> Decision:
        user = self.caller.user
        return self._listing("/volumes", lambda data: filters.volumes(data, user))

    async def _volume(self, body: bytes) -> Decision:
        name = self.match.params["volume"]
        found = await self.daemon.volume(name)
        if found is None:
            raise NotFound(f"get {name}: no such volume")
        owner = policy.owner_label(found)
        if owner != self.caller.user:
            raise Refused(denial("volume", owner))
        return self._forward(self._path(volume=found["Name"]))

    async def _volume_create(self, body: bytes) -> Decision:
        request = policy.admit_volume_create(self._json(body), self.caller)
        name = request.get("Name") or ""
        if name:
            existing = await self.daemon.volume(name)
            if existing is not None:
                owner = policy.owner_label(existing)
                if owner != self.caller.user:
                    raise Refused(denial("volume", owner))
        caller = self.caller

        async def rewrite(status: int, data: bytes) -> tuple[int, bytes]:
            made = json.loads(data) if status == 201 else None
            if isinstance(made, dict):
                wrong = verify.volume_violations(made, caller)
                if wrong:
                    if policy.owner_label(made) == caller.user:
                        await self.daemon.delete(f"/volumes/{quote(made['Name'], safe='')}")
                    return 403, message(f"Permission denied: {'; '.join(wrong)}")
            return status, data

        return self._forward("/volumes/create", request, rewrite=rewrite)

    async def _network_list(self, body: bytes) -> Decision:
        user, owner = self.caller.user, self.gateway.container_owner
        return self._listing("/networks", lambda data: filters.networks(data, user, owner))

    async def _network_read(self, body: bytes) -> Decision:
        found = await self._network_found(self.match.params["network"])
        if not (found.shared or found.owner == self.caller.user):
            raise Refused(denial("network", found.owner))
        user, owner = self.caller.user, self.gateway.container_owner
        path = self._path(network=found.id)
        return self._listing(path, lambda data: filters.networks(data, user, owner))

    async def _network(self, body: bytes) -> Decision:
        found = await self._network_found(self.match.params["network"])
        policy.require_own("network", found, self.caller)
        return self._forward(self._path(network=found.id))

    async def _network_create(self, body: bytes) -> Decision:
        request = policy.admit_network_create(self._json(body), self.caller)
        caller = self.caller

        async def rewrite(status: int, data: bytes) -> tuple[int, bytes]:
            if status != 201:
                return status, data
            network_id = str((json.loads(data) or {}).get("Id", ""))
            made = await self.daemon.network(network_id) or {}
            wrong = verify.network_violations(made, caller)
            if wrong:
                await self.daemon.delete(f"/networks/{network_id}")
                return 403, message(f"Permission denied: {'; '.join(wrong)}; removed")
            return status, data

        return self._forward("/networks/create", request, rewrite=rewrite)

    async def _network_connect(self, body: bytes) -> Decision:
        found = await self._network_found(self.match.params["network"])
        if not (found.shared or found.owner == self.caller.user):
            raise Refused(denial("network", found.owner))
        request = self._json(body) or {}
        container = await self._own_container(request.get("Container") or "")
        request["Container"] = container["Id"]
        if request.get("EndpointConfig") is not None:
            request["EndpointConfig"] = policy.admit_endpoint(request["EndpointConfig"])
        return self._forward(self._path(network=found.id), request)
