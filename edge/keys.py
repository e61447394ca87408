"""Typed keys for the state an aiohttp app carries (never globals)."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from edge.engine import Engine
from edge.metrics import Metrics
from edge.settings import Settings


@dataclass
class ModelState:
    """The loaded models by name, and whether loading has finished."""
    models: dict = field(default_factory=dict)        # name -> models.api.Model
    aliases: dict = field(default_factory=dict)       # lower-case alias -> name
    ready: bool = False
    failed: str | None = None                          # why loading failed, if it did


SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", Engine)
METRICS = web.AppKey("metrics", Metrics)
MODELS = web.AppKey("models", ModelState)
