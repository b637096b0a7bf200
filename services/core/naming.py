"""Container names as Docker, MLC and ds01 spell them: ``<name>._.<user>``."""

from __future__ import annotations

import re

SEPARATOR = "._."
OWNER_LABEL = "ds01.user"  # on every container, volume, network and image a user owns
# On every container made through ds01's Docker gateway. Its other ds01 and mlc labels
# may come from the image (which a user can build): they never speak for GPUs or
# protection.
GATEWAY_LABEL = "ds01.gateway"


def docker_user(user: str) -> str:
    """A user name as Docker names allow it ([a-zA-Z0-9_.-]): h.baker@x.org -> h.baker_x.org."""
    return re.sub(r"[^a-zA-Z0-9_.-]", "_", user)


def belongs_to(container: str, user: str) -> bool:
    """Whether ``container`` is named as one of ``user``'s: ``<name>._.<user>``."""
    name, separator, owner = container.rpartition(SEPARATOR)
    return bool(name) and bool(separator) and owner == docker_user(user)


def sanitize_for_systemd(name: str) -> str:
    """The seed's rule for slice names: h.baker@hertie-school.lan ->
    h_baker_hertie-school_lan (systemd reads a dash as a level of the slice tree)."""
    return name.replace("@", "_").replace(".", "_")
