"""The program-indicator catalogue (the regent's 22 work promises): a YAML file validated at load.

`load_catalogue()` reads Settings.indicator_catalogue_file or the shipped example (catalogue.yaml).
Periods (WIB calendar) and standing against target live here too, so the stream stage, the
recompute and the API share one definition. See docs/indicators.md.
"""

from .catalogue import (
    Catalogue,
    CatalogueError,
    Condition,
    Formula,
    Indicator,
    Target,
    load_catalogue,
    parse_catalogue,
)
from .periods import PERIOD_NAMES, period_end, period_start

__all__ = [
    "PERIOD_NAMES", "Catalogue", "CatalogueError", "Condition", "Formula", "Indicator", "Target",
    "load_catalogue", "parse_catalogue", "period_end", "period_start",
]
