"""Which template settings would make the trainer pod privileged.

Creating a TrainingJob must not be a way around the rights needed to create such pods, so the
decision core refuses a job that asks for any of these unless the operator is configured to allow it.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..api.models import TrainingJobSpec


def privileged_settings(spec: TrainingJobSpec) -> list[str]:
    """Field paths of the privileged settings the spec asks for (empty: none)."""
    template = spec.template
    if template is None:
        return []
    found: list[str] = []
    if template.host_network:
        found.append("template.hostNetwork")
    for index, volume in enumerate(template.volumes or []):
        if isinstance(volume, Mapping) and volume.get("hostPath") is not None:
            found.append(f"template.volumes[{index}].hostPath")
    context = template.container_security_context or {}
    if context.get("privileged") is True:
        found.append("template.containerSecurityContext.privileged")
    capabilities = context.get("capabilities")
    if isinstance(capabilities, Mapping) and capabilities.get("add"):
        found.append("template.containerSecurityContext.capabilities.add")
    if context.get("allowPrivilegeEscalation") is True:
        found.append("template.containerSecurityContext.allowPrivilegeEscalation")
    return found
