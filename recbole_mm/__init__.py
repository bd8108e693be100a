"""recbole-mm: multimodal recommenders (MambaRec, FindRec) as a RecBole plug-in.

Importing the package applies the compatibility fixes and registers our models into RecBole
(both in :mod:`recbole_mm.compat`, the one module that changes RecBole's); after that both
``recbole_mm.quick_start.run_recbole`` and RecBole's own ``recbole.quick_start.run_recbole``
run FindRec, MambaRec and every RecBole model by name.
"""

import os
import sys

# torch's CPU threads (libgomp) spin 300,000 times at each barrier before they sleep; beside another busy
# job in a session of its own, a two-thread run then spends its share of the cores spinning: 19-89x
# slower steps, against 1.5-8x spinning 10,000 times and no cost alone (docs/design.md, §threads). libgomp
# reads the setting when torch loads, so it is set before the first import of torch, and only where the
# user has chosen neither variable.
if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    os.environ["GOMP_SPINCOUNT"] = "10000"

from recbole_mm import compat  # noqa: E402

compat.apply()

from recbole_mm import quick_start, registry  # noqa: E402
from recbole_mm.config import Config  # noqa: E402

compat.register_into_recbole(registry, Config, quick_start)

from recbole_mm.quick_start import load_data_and_model, run, run_recbole  # noqa: E402
from recbole_mm.registry import create_dataset, get_model, get_trainer  # noqa: E402
from recbole_mm.utils import build_data_and_model  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Config", "run", "run_recbole", "load_data_and_model", "build_data_and_model", "create_dataset",
           "get_model", "get_trainer"]
