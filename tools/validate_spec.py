#!/usr/bin/env python
"""Check megaspec spec files: `python tools/validate_spec.py specs/*.yaml` (same as `megaspec validate`)."""

import sys

from megaspec.validate import main

if __name__ == "__main__":
    sys.exit(main())
