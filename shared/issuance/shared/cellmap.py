"""The cell map of the settings (``ISSUANCE_CELLS``), and each cell's settings.

No cells configured means one implicit cell, ``main`` (number 0, every ring
slot), made of the deployment's own database, broker and Redis: the embedded
demo and single-box users see no change.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from issuance.shared.domain.cells import RING_SLOTS, Cell, CellMap, CellMapError, build_map
from issuance.shared.errors import ConfigurationError
from issuance.shared.settings import PREFIX, Settings

IMPLICIT = "main"


def configured(settings: Settings) -> bool:
    return bool(settings.cells.strip())


def load_cell_map(settings: Settings) -> CellMap:
    """The checked cell map; a one-line ConfigurationError if it is unusable."""
    text = settings.cells.strip()
    if not text:
        implicit = Cell(
            name=IMPLICIT,
            number=0,
            database_url=settings.database_url,
            amqp_url=settings.amqp_url,
            redis_url=settings.redis_url,
            slots=tuple(range(RING_SLOTS)),
        )
        return CellMap((implicit,), (0,) * RING_SLOTS)
    try:
        return build_map(map_entries(settings))
    except CellMapError as exc:
        raise ConfigurationError(f"{PREFIX}CELLS: {exc}") from None


def map_entries(settings: Settings) -> list[dict[str, object]]:
    """The cells of ``ISSUANCE_CELLS`` as written (JSON, or a file of it)."""
    text = settings.cells.strip()
    name = f"{PREFIX}CELLS"
    if not text.startswith(("[", "{")):
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise ConfigurationError(f"{name}: cannot read the cell map file: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{name} is not JSON: {exc}") from None
    entries = data.get("cells") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigurationError(f"{name} must be a list of cells (objects)")
    return entries


def home_cell(settings: Settings) -> Cell | None:
    """The cell this process serves (``ISSUANCE_CELL``), or None when unset;
    a one-line ConfigurationError if the map does not name it."""
    name = settings.cell.strip()
    if not name:
        return None
    if not configured(settings):
        raise ConfigurationError(f"{PREFIX}CELL={name} needs {PREFIX}CELLS, the cell map that names it")
    try:
        return load_cell_map(settings).by_name(name)
    except CellMapError as exc:
        raise ConfigurationError(f"{PREFIX}CELL: {exc}") from None


def cell_settings(settings: Settings, cell: Cell) -> Settings:
    """The settings of one cell: its database, broker and Redis; no cell map,
    so that a process given them is a plain single-cell deployment."""
    return dataclasses.replace(
        settings,
        database_url=cell.database_url,
        amqp_url=cell.amqp_url,
        redis_url=cell.redis_url or settings.redis_url,
        cells="",
        cell="",
    )
