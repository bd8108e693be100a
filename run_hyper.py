"""Tune any recbole-mm or RecBole model with RecBole's run_hyper.py flags.

    python run_hyper.py --model=FindRec --dataset=amazon-beauty --params_file=properties/hyper/FindRec.hyper

See ``python run_hyper.py --help`` and :mod:`recbole_mm.quick_start.hyper`.
"""

from recbole_mm.quick_start.hyper import main

if __name__ == "__main__":
    main()
