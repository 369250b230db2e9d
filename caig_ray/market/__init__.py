"""The simulated ad market (docs/market.md): catalog, description language, procedural renderer,
hidden click model, historical click logs and the evaluation oracles."""

from caig_ray.market.catalog import make_catalog
from caig_ray.market.clicks import ClickModel, History, bayes_ceiling, make_history, noise_key
from caig_ray.market.language import Background, parse_description
from caig_ray.market.render import ProceduralRenderer

__all__ = [
    "Background", "ClickModel", "History", "ProceduralRenderer", "bayes_ceiling", "make_catalog",
    "make_history", "noise_key", "parse_description",
]
