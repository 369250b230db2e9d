"""Readers and writers for the catalog and click logs; bad input is refused with file/row/field."""

from caig_ray.data.catalog import DataError, Product, read_catalog, write_catalog
from caig_ray.data.clicklogs import load_log_image, read_click_logs, write_click_logs

__all__ = [
    "DataError", "Product", "load_log_image", "read_catalog", "read_click_logs", "write_catalog",
    "write_click_logs",
]
