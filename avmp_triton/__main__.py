"""``python -m avmp_triton``: the main job (see ``avmp_triton.cli``)."""
from avmp_triton.cli import main

raise SystemExit(main())
