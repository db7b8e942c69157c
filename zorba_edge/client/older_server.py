"""Registering with an older server: the optional profile fields it does not know, left out.

Protocol v1 grows by optional fields (docs/protocol.md, "Fields added within v1"): a newer
peer leaves one out while it holds its default, and an older peer's strict decoder refuses one
it does not know (`400 invalid_message`, naming it: "unknown field(s) ['base_rms']"). A newer
client that registers with an older server would send its measured `DeviceProfile.base_rms`
and be refused for good. So a refusal that names only fields of OPTIONAL_PROFILE_FIELDS that
the request carried is answered by registering again without them (pure: the transport
retries, and says so once in the log). Any other refusal stands.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from zorba_common.messages import DeviceProfile, RegisterRequest
from zorba_edge.client.errors import ServerRefusedError

OPTIONAL_PROFILE_FIELDS = ("base_rms", "fluency_curvature", "task_probe")
"""DeviceProfile fields added within v1 that a server can do without (the drift bound then
has no base RMS or fluency curvature from this client, the step rule no task probe: the
server takes the other clients', or runs without them)."""
_UNKNOWN = re.compile(r"unknown field\(s\) \[([^\]]*)\]")


def unknown_fields(refusal: ServerRefusedError) -> tuple[str, ...]:
    """The fields a strict decoder's refusal names as unknown (none: another refusal)."""
    if refusal.status != 400:
        return ()
    found = _UNKNOWN.search(refusal.server_message)
    return () if found is None else tuple(re.findall(r"'([^']*)'", found.group(1)))


def without_unknown(request: RegisterRequest, refusal: ServerRefusedError) -> RegisterRequest | None:
    """`request` without the optional profile fields `refusal` names, or None when it names
    none, or a field that is not optional, or one the request did not carry."""
    names = unknown_fields(refusal)
    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(DeviceProfile)}
    if not names or any(n not in OPTIONAL_PROFILE_FIELDS for n in names) or any(
            getattr(request.profile, n) == defaults[n] for n in names):
        return None
    profile = dataclasses.replace(request.profile, **{n: defaults[n] for n in names})
    return dataclasses.replace(request, profile=profile)
