"""Model families. Importing this package registers every model variant."""

from mlic.models import baseline  # noqa: F401  (registers models)
from mlic.models.registry import create_model, is_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model", "is_model"]
