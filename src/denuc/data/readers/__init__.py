"""Built-in dataset readers; importing this package registers them."""

from denuc.data.readers import brca_m2c, generic, ocelot, puma  # noqa: F401
