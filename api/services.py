"""The API's adapters, built once in the lifespan and handed to handlers."""

from __future__ import annotations

from dataclasses import dataclass

from api.admission import QueueMonitor
from api.auth import ApiKeys
from api.relay import Spawn
from broker.bus import Bus
from broker.workers import WorkerRegistry
from chatq.settings import Settings


@dataclass
class Services:
    settings: Settings
    bus: Bus
    monitor: QueueMonitor
    registry: WorkerRegistry
    keys: ApiKeys
    spawn: Spawn

    def known_models(self) -> list[str]:
        """Configured models first, then any other model a live worker serves."""
        models = list(self.settings.models)
        models += sorted(self.registry.models() - set(models))
        return models
