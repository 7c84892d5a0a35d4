"""The built-in modules, one folder per kind; `megaspec.catalog` imports them to register them."""
