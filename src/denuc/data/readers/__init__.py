"""Built-in dataset readers; importing this package registers them."""

from denuc.data.readers import brca_m2c  # noqa: F401
